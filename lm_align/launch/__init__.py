"""Launchers: `lm-align launch local` (several processes on this machine) and
`lm-align launch tpu` (Cloud TPU VMs, queued resources, GKE via xpk)."""
