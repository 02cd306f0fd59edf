"""The README and docs/ stay true to the tree: every relative link points at a file that exists (and at a
heading that exists, when it names one), and the README stays a front page, not a manual."""
import glob
import os
import re

from conftest import ROOT

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def doc_files():
    files = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    files += sorted(glob.glob(os.path.join(ROOT, "integrations", "*", "README.md")))
    return files


def slug(heading):
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, re.M)}


def links(path):
    with open(path, encoding="utf-8") as f:
        text = FENCE.sub("", f.read())
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans are not links
    for m in LINK.finditer(text):
        yield m.group(1) or m.group(2)


def test_every_relative_link_points_at_something_that_exists():
    problems, checked = [], 0
    for path in doc_files():
        for target in links(path):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto: ... are not ours to check
            checked += 1
            name, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), name)) if name else path
            where = os.path.relpath(path, ROOT)
            if not os.path.exists(dest):
                problems.append("%s: %s does not exist" % (where, target))
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                problems.append("%s: %s has no heading #%s" % (where, os.path.relpath(dest, ROOT), anchor))
    assert checked > 20, "the link check found almost no links to check (%d): is the pattern broken?" % checked
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_page():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size < 20000, "README.md is %d bytes: keep it a five-minute read and move reference material to docs/" % size
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for section in ("## Install", "## Quick start", "## Connect your agents"):
        assert "\n" + section + "\n" in text, "the README lost its %r section" % section


def test_the_link_check_notices_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](page.md#title) [gone](missing.md) [bad anchor](page.md#nowhere)\n", encoding="utf-8")
    assert list(links(str(page))) == ["page.md#title", "missing.md", "page.md#nowhere"]
    assert anchors(str(page)) == {"title"}


def test_every_server_setting_is_documented():
    import sys

    sys.path.insert(0, ROOT)
    import agent_relay

    with open(os.path.join(ROOT, "docs", "configuration.md"), encoding="utf-8") as f:
        text = f.read()
    missing = [var for _attr, var, flag, *_rest in agent_relay.SETTINGS
               if "`%s`" % var not in text or "`%s`" % flag not in text]
    assert not missing, "docs/configuration.md does not list these settings (variable and flag): %r" % missing
