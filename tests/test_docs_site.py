"""mkdocs.yml's nav lists every page under docs/, and every page it lists exists;
README shows the test command CI runs.

Fast (no build): `mkdocs build --strict` (README, "Run the tests") renders the
site; this test keeps a new docs page from being left out of the navigation.
"""

import os
import re

import yaml

from tests.helpers import REPO


class _Loader(yaml.SafeLoader):
    """SafeLoader that tolerates mkdocs' `!!python/name:` and `!ENV` tags."""


_Loader.add_multi_constructor("", lambda loader, suffix, node: None)


def _config():
    with open(os.path.join(REPO, "mkdocs.yml"), encoding="utf-8") as f:
        return yaml.load(f, Loader=_Loader)


def _nav_pages(entry):
    """Every page path in a nav entry (a str, a {title: entry} dict or a list)."""
    if isinstance(entry, str):
        return [] if "://" in entry else [entry]
    if isinstance(entry, dict):
        return [page for value in entry.values() for page in _nav_pages(value)]
    return [page for item in entry for page in _nav_pages(item)]


def _docs_pages(docs_dir):
    pages = []
    for root, dirs, files in os.walk(docs_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        pages += [
            os.path.relpath(os.path.join(root, name), docs_dir).replace(os.sep, "/")
            for name in files
            if name.endswith(".md")
        ]
    return pages


def test_every_docs_page_is_in_the_nav():
    config = _config()
    docs_dir = os.path.join(REPO, config.get("docs_dir", "docs"))
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"pages listed twice in mkdocs.yml nav: {nav}"
    missing = sorted(set(_docs_pages(docs_dir)) - set(nav))
    assert not missing, f"docs pages missing from mkdocs.yml nav: {missing}"
    absent = sorted(p for p in nav if not os.path.isfile(os.path.join(docs_dir, p)))
    assert not absent, f"mkdocs.yml nav lists pages that do not exist: {absent}"


def _pytest_commands(text):
    """Every `pytest ...` command line of a shell script or of a README code block."""
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#") or "pytest " not in line:
            continue
        commands.append("pytest " + line.split("pytest ", 1)[1].strip())
    return commands


def test_readme_shows_the_test_command_ci_runs():
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = _pytest_commands(f.read())
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    blocks = re.findall(r"^```bash\n(.*?)^```", readme, re.DOTALL | re.MULTILINE)
    shown = [c for block in blocks for c in _pytest_commands(block)]
    assert ci, ".ci/run runs no pytest command"
    assert set(ci) <= set(shown), f".ci/run runs {ci}; README shows {shown}"
