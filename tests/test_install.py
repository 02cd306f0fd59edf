"""install.sh installs the real agent_relay.py into a temporary HOME; install.ps1
(which cannot run here) is checked for its structure."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import RELAY_PY, ROOT, need
from test_meta import find_python

INSTALL_SH = os.path.join(ROOT, "install.sh")
INSTALL_PS1 = os.path.join(ROOT, "install.ps1")
DEFAULT_URL = "https://raw.githubusercontent.com/agent-relay/agent-relay/main/agent_relay.py"
SHEBANG = b"#!/usr/bin/env python3\n"


def clean_path(*drop):
    """PATH without the given folders (and without any ~/.local/bin), so the installer's hint shows."""
    drop = {os.path.normpath(d) for d in drop}
    keep = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or os.path.normpath(d) in drop or os.path.normpath(d).endswith(os.path.join(".local", "bin")):
            continue
        keep.append(d)
    return os.pathsep.join(keep)


def install(tmp_path, *args, source=RELAY_PY, prefix=None, path=None, stdin_script=False):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_") and k != "CODEX_HOME"}
    env.update(HOME=str(home), TMPDIR=str(tmpdir), AGENT_RELAY_SOURCE=str(source),
               PATH=path if path is not None else clean_path())
    if prefix is not None:
        env["AGENT_RELAY_PREFIX"] = str(prefix)
    if stdin_script:
        # As under `curl -fsSL URL | sh -s -- ARGS`: the script arrives on standard input.
        with open(INSTALL_SH, "rb") as f:
            r = subprocess.run(["sh", "-s", "--"] + list(args), stdin=f, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, timeout=120, check=False)
    else:
        r = subprocess.run(["sh", INSTALL_SH] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env, timeout=120, check=False)
    r.out = r.stdout.decode("utf-8", "replace")
    r.err = r.stderr.decode("utf-8", "replace")
    r.home = home
    r.tmpdir = tmpdir
    return r


def relay_version():
    r = subprocess.run([sys.executable, RELAY_PY, "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL, timeout=60, check=False, universal_newlines=True)
    assert r.returncode == 0, r.stdout + r.stderr
    line = r.stdout.strip()
    assert re.match(r"^agent-relay \S+$", line), line
    return line


def expected_installed_bytes(source=RELAY_PY):
    with open(source, "rb") as f:
        data = f.read()
    if data.startswith(SHEBANG):
        return data
    if data.startswith(b"#!"):
        data = data.split(b"\n", 1)[1]
    return SHEBANG + data


def assert_one_good_install(bindir, r):
    assert sorted(os.listdir(str(bindir))) == ["agent-relay"], "stray files: %r" % os.listdir(str(bindir))
    exe = bindir / "agent-relay"
    mode = exe.stat().st_mode
    assert stat.S_ISREG(mode) and mode & stat.S_IXUSR, oct(mode)
    assert exe.read_bytes() == expected_installed_bytes()
    # Runs through its own shebang, as a user would run it.
    v = subprocess.run([str(exe), "--version"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       stdin=subprocess.DEVNULL, timeout=60, check=False, universal_newlines=True)
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.strip() == relay_version()
    assert relay_version() in r.out, "the installer should end by printing the version:\n" + r.out
    assert os.listdir(str(r.tmpdir)) == [], "temporary files left behind"


def test_install_twice_into_home(tmp_path):
    bindir = tmp_path / "home" / ".local" / "bin"
    first = install(tmp_path)
    assert first.returncode == 0, first.out + first.err
    assert_one_good_install(bindir, first)
    assert "not on your PATH" in first.out and str(bindir) in first.out, first.out

    # The second run replaces the old copy (here deliberately spoiled) and succeeds too.
    (bindir / "agent-relay").write_text("#!/bin/sh\necho old copy\n")
    second = install(tmp_path)
    assert second.returncode == 0, second.out + second.err
    assert_one_good_install(bindir, second)


def test_prefix_is_honoured(tmp_path):
    prefix = tmp_path / "opt" / "relay"
    r = install(tmp_path, prefix=prefix)
    assert r.returncode == 0, r.out + r.err
    assert_one_good_install(prefix / "bin", r)
    assert not (r.home / ".local").exists(), "installed into HOME despite AGENT_RELAY_PREFIX"


def test_no_path_hint_when_bin_dir_is_on_path(tmp_path):
    bindir = tmp_path / "home" / ".local" / "bin"
    r = install(tmp_path, path=str(bindir) + os.pathsep + clean_path())
    assert r.returncode == 0, r.out + r.err
    assert "not on your PATH" not in r.out, r.out


def test_piped_install_like_curl_pipe_sh(tmp_path):
    r = install(tmp_path, stdin_script=True)
    assert r.returncode == 0, r.out + r.err
    assert_one_good_install(tmp_path / "home" / ".local" / "bin", r)


def test_missing_source_fails_cleanly(tmp_path):
    missing = tmp_path / "nowhere" / "agent_relay.py"
    r = install(tmp_path, source=missing)
    assert r.returncode != 0, r.out + r.err
    assert "not found" in r.err and str(missing) in r.err, r.err
    assert "Traceback" not in r.out + r.err
    bindir = tmp_path / "home" / ".local" / "bin"
    assert not bindir.exists() or os.listdir(str(bindir)) == [], "partial install left behind"
    assert os.listdir(str(r.tmpdir)) == [], "temporary files left behind"


def test_failed_update_keeps_the_old_copy(tmp_path):
    good = install(tmp_path)
    assert good.returncode == 0, good.out + good.err
    bindir = tmp_path / "home" / ".local" / "bin"
    broken = tmp_path / "broken.py"
    broken.write_text("<html>404 Not Found</html>\n")
    r = install(tmp_path, source=broken)
    assert r.returncode != 0, r.out + r.err
    assert "does not run" in r.err, r.err
    assert_one_good_install(bindir, good)


def test_daemon_flag_runs_setup_then_daemon_install(tmp_path):
    # A stand-in that records its arguments: the real `daemon install --start` would
    # change this machine's services, which a test must not do.
    log = tmp_path / "calls.log"
    standin = tmp_path / "agent_relay.py"
    standin.write_text(
        "#!/usr/bin/env python3\n"
        "import sys\n"
        "if sys.argv[1:] == ['--version']:\n"
        "    print('agent-relay 9.9.9-standin')\n"
        "else:\n"
        "    open(%r, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n" % str(log)
    )
    r = install(tmp_path, "--daemon", source=standin)
    assert r.returncode == 0, r.out + r.err
    exe = tmp_path / "home" / ".local" / "bin" / "agent-relay"
    assert log.read_text().splitlines() == [
        "setup --yes",
        "daemon install --binary %s --enable --start --yes" % exe,
    ]
    assert r.out.rstrip().splitlines()[-2] == "agent-relay 9.9.9-standin", r.out


def test_codex_flag_runs_codex_install_with_the_installed_file(tmp_path):
    """--codex: after installing, `agent-relay codex install --yes` sets up ~/.codex with hooks that run the installed
    agent-relay (their trust recorded in config.toml), notify, and the AGENTS.md note."""
    r = install(tmp_path, "--codex")
    assert r.returncode == 0, r.out + r.err
    exe = str(tmp_path / "home" / ".local" / "bin" / "agent-relay")
    assert "running: agent-relay codex install --yes" in r.out, r.out
    codex = tmp_path / "home" / ".codex"
    hooks = json.loads((codex / "hooks.json").read_text())["hooks"]
    assert sorted(hooks) == ["PreToolUse", "SessionStart", "Stop", "UserPromptSubmit"], hooks
    assert hooks["Stop"][0]["hooks"][0]["command"] == exe + " hook codex stop"
    config = (codex / "config.toml").read_text()
    assert 'notify = ["%s", "hook", "codex", "notify"]' % exe in config and config.count("trusted_hash = ") == 4, config
    assert "## Agent Relay" in (codex / "AGENTS.md").read_text()
    assert r.out.rstrip().splitlines()[-2] == relay_version(), r.out


def test_help_and_unknown_option(tmp_path):
    r = install(tmp_path, "--help")
    assert r.returncode == 0, r.err
    for word in ("--daemon", "AGENT_RELAY_SOURCE", "AGENT_RELAY_PREFIX", "3.8"):
        assert word in r.out, word
    assert not (tmp_path / "home" / ".local").exists()
    r = install(tmp_path, "--bogus")
    assert r.returncode != 0
    assert "--bogus" in r.err


def test_old_python3_is_refused_with_a_message(tmp_path):
    old = find_python(7) or find_python(6)
    if old is None:
        pytest.skip("no Python 3.6 or 3.7 interpreter on this machine")
    fake_bin = tmp_path / "oldbin"
    fake_bin.mkdir()
    os.symlink(old, str(fake_bin / "python3"))
    r = install(tmp_path, path=str(fake_bin) + os.pathsep + clean_path())
    assert r.returncode != 0, r.out + r.err
    assert "3.8" in r.err and "python3 is Python 3." in r.err, r.err
    assert not (tmp_path / "home" / ".local").exists()


def test_missing_python3_is_reported(tmp_path):
    # A PATH with the tools the script needs but no python3.
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("sh", "head", "tail", "cp", "mv", "chmod", "mkdir", "mktemp", "rm", "cat"):
        found = shutil.which(name)
        if found:
            os.symlink(found, str(tools / name))
    r = install(tmp_path, path=str(tools))
    assert r.returncode != 0, r.out + r.err
    assert "python3 was not found" in r.err and "3.8" in r.err, r.err


def test_install_sh_passes_shellcheck():
    r = subprocess.run(["sh", "-n", INSTALL_SH], stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    assert r.returncode == 0, r.stderr
    need(shutil.which("shellcheck"), "shellcheck is not installed (apt-get install shellcheck)")
    r = subprocess.run(["shellcheck", INSTALL_SH], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       check=False, universal_newlines=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout == "", r.stdout


# -- install.ps1 ------------------------------------------------------------------------
def ps1_text():
    with open(INSTALL_PS1, "rb") as f:
        return f.read()


def ps1_code(text):
    """install.ps1 with strings, here-strings and comments blanked, for structural checks."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("<#", i):
            j = text.index("#>", i + 2) + 2
            out.append(" ")
            i = j
        elif c == "#":
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("@'", i) or text.startswith('@"', i):
            end = "\n" + text[i + 1] + "@"
            j = text.index(end, i + 2) + len(end)
            out.append("''")
            i = j
        elif c == "'":
            j = i + 1
            while True:
                j = text.index("'", j)
                if text.startswith("''", j):
                    j += 2
                    continue
                break
            out.append("''")
            i = j + 1
        elif c == '"':
            j = i + 1
            while text[j] != '"':
                j += 2 if text[j] == "`" else 1
            out.append("''")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def test_install_ps1_structure():
    raw = ps1_text()
    # Windows PowerShell 5 reads a file without a BOM in the ANSI code page: keep it ASCII.
    assert all(b < 128 for b in raw), "install.ps1 must be plain ASCII"
    text = raw.decode("ascii")
    code = ps1_code(text)
    for open_, close in ("{}", "()", "[]"):
        depth = 0
        for ch in code:
            depth += (ch == open_) - (ch == close)
            assert depth >= 0, "unbalanced %s%s" % (open_, close)
        assert depth == 0, "unbalanced %s%s" % (open_, close)
    assert re.search(r"(?s)\[CmdletBinding\(\)\]\s*param\(\s*\[switch\]\$Daemon", code), "param block with -Daemon"
    assert "$env:AGENT_RELAY_SOURCE" in text and DEFAULT_URL in text
    assert "$env:LOCALAPPDATA" in text and "'agent-relay'" in text and "'agent-relay.cmd'" in text
    assert "'py'" in text and "@('-3')" in text and "'python'" in text, "looks for py -3 and python"
    assert "[version]'3.8'" in text, "checks for Python 3.8 or newer"
    assert '"%~dp0..\\agent_relay.py" %*' in text, "cmd shim runs the installed file"
    assert "'setup', '--yes'" in text
    assert "'daemon', 'install', '--binary'" in text and "'--enable', '--start', '--yes'" in text
    assert "'--version'" in text
    assert re.search(r"\[switch\]\$Codex", code) and "$Codex.IsPresent" in text, "-Codex switch"
    assert "@('codex', 'install', '--yes')" in text, "-Codex runs agent-relay codex install --yes"
    assert "DoNotExpandEnvironmentNames" in text and "ExpandString" in text, "user PATH kept as REG_EXPAND_SZ"
    # Only the file-run branch may exit: under `irm | iex` an exit closes the user's window.
    assert len(re.findall(r"\bexit\b", code, re.I)) == 1
    with open(INSTALL_SH) as f:
        assert DEFAULT_URL in f.read(), "install.sh and install.ps1 should fetch from the same place"
