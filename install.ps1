<#
.SYNOPSIS
Installs Agent Relay on Windows (PowerShell 5 or newer).

.DESCRIPTION
Installs agent_relay.py (needs Python 3.8 or newer) as
  %LOCALAPPDATA%\agent-relay\agent_relay.py
with a command shim
  %LOCALAPPDATA%\agent-relay\bin\agent-relay.cmd
and adds that bin folder to the user PATH when it is missing. Safe to run
again: it replaces the old copy.

Environment:
  AGENT_RELAY_SOURCE  where to get agent_relay.py: a URL or a local file path
                      (default: the project's main branch)

.PARAMETER Daemon
Afterwards run 'agent-relay setup --yes' and install, enable and start the
relay as a background service for this user.

.PARAMETER Codex
Afterwards run 'agent-relay codex install --yes': the Codex hooks (trusted),
notify and sandbox network access in $env:CODEX_HOME (default ~\.codex).

.EXAMPLE
irm https://raw.githubusercontent.com/agent-relay/agent-relay/main/install.ps1 | iex

.EXAMPLE
& ([scriptblock]::Create((irm https://raw.githubusercontent.com/agent-relay/agent-relay/main/install.ps1))) -Daemon

.EXAMPLE
powershell -ExecutionPolicy Bypass -File install.ps1 -Daemon
#>
[CmdletBinding()]
param(
    [switch]$Daemon,
    [switch]$Codex,
    [switch]$Help
)

# Everything lives in functions so that, under `irm | iex`, no setting leaks
# into the caller's session and nothing runs before the whole script is read.

function Write-AgentRelayStep([string]$Text) {
    Write-Host "agent-relay install: $Text"
}

function Show-AgentRelayUsage {
    Write-Host @'
Usage: powershell -ExecutionPolicy Bypass -File install.ps1 [-Daemon] [-Codex] [-Help]
       irm <url>/install.ps1 | iex
       & ([scriptblock]::Create((irm <url>/install.ps1))) -Daemon

Installs Agent Relay (one Python file, needs Python 3.8 or newer) as
  %LOCALAPPDATA%\agent-relay\agent_relay.py  and  %LOCALAPPDATA%\agent-relay\bin\agent-relay.cmd

  -Daemon   afterwards run 'agent-relay setup --yes' and install, enable and
            start the relay as a background service for this user
  -Codex    afterwards run 'agent-relay codex install --yes' (Codex hooks,
            trusted, notify and sandbox network access)
  -Help     show this help

Environment:
  AGENT_RELAY_SOURCE  where to get agent_relay.py: a URL or a local file path
'@
}

# Returns @{ Path = <python.exe>; Version = <version> } for the first Python 3.8+
# among `py -3`, `python3` and `python`, or throws with a message saying what was found.
function Find-AgentRelayPython {
    $candidates = @(
        @{ Exe = 'py'; Prefix = @('-3') },
        @{ Exe = 'python3'; Prefix = @() },
        @{ Exe = 'python'; Prefix = @() }
    )
    # No double quotes in the probe: Windows PowerShell 5 mangles them in native arguments.
    # Native stderr must not turn into a terminating error here (Windows PowerShell 5 does that under 'Stop').
    $ErrorActionPreference = 'Continue'
    $probe = 'import sys; print(sys.version_info[0], sys.version_info[1], sys.version_info[2]); print(sys.executable)'
    $seen = @()
    foreach ($c in $candidates) {
        $cmd = Get-Command $c.Exe -CommandType Application -ErrorAction SilentlyContinue | Select-Object -First 1
        if (-not $cmd) { continue }
        $arguments = @($c.Prefix) + @('-c', $probe)
        try {
            $out = @(& $cmd.Path @arguments 2>$null)
        } catch {
            continue
        }
        # The Microsoft Store alias python.exe prints nothing and fails: skip it.
        if ($LASTEXITCODE -ne 0 -or $out.Count -lt 2) { continue }
        $parts = "$($out[0])".Trim() -split '\s+'
        if ($parts.Count -lt 3) { continue }
        $version = [version]("{0}.{1}.{2}" -f $parts[0], $parts[1], $parts[2])
        $exe = "$($out[1])".Trim()
        if ($version -ge [version]'3.8') {
            return @{ Path = $exe; Version = $version }
        }
        $seen += "$($c.Exe) is Python $version"
    }
    if ($seen.Count -gt 0) {
        throw ("Agent Relay needs Python 3.8 or newer, but " + ($seen -join ', ') +
            ". Install a newer Python 3 (https://www.python.org/downloads/ or 'winget install Python.Python.3.12') and run this installer again.")
    }
    throw ("Python was not found ('py -3', 'python3' and 'python' are missing or do not run). Agent Relay needs Python 3.8 or newer: " +
        "install it (https://www.python.org/downloads/ or 'winget install Python.Python.3.12') and run this installer again.")
}

function Get-AgentRelaySource([string]$Source, [string]$Destination) {
    if ($Source -match '^(https?|ftp)://') {
        try {
            # Windows PowerShell 5 may default to TLS 1.0.
            [Net.ServicePointManager]::SecurityProtocol = [Net.ServicePointManager]::SecurityProtocol -bor [Net.SecurityProtocolType]::Tls12
        } catch { }
        try {
            Invoke-WebRequest -Uri $Source -OutFile $Destination -UseBasicParsing
        } catch {
            throw "could not download ${Source}: $($_.Exception.Message)"
        }
    } else {
        $path = $Source -replace '^file:///?', ''
        if (-not (Test-Path -LiteralPath $path -PathType Leaf)) {
            throw "source file not found: $path (AGENT_RELAY_SOURCE)"
        }
        Copy-Item -LiteralPath $path -Destination $Destination -Force
    }
    if (-not (Test-Path -LiteralPath $Destination) -or (Get-Item -LiteralPath $Destination).Length -eq 0) {
        throw "$Source is empty"
    }
}

# Moves $Source over $Destination in one step (File.Replace when a copy exists).
function Move-AgentRelayFile([string]$Source, [string]$Destination) {
    if (Test-Path -LiteralPath $Destination -PathType Leaf) {
        [System.IO.File]::Replace($Source, $Destination, [NullString]::Value)
    } else {
        [System.IO.File]::Move($Source, $Destination)
    }
}

function Add-AgentRelayUserPath([string]$Dir) {
    $key = [Microsoft.Win32.Registry]::CurrentUser.OpenSubKey('Environment', $true)
    try {
        # Read the raw value so that %VARIABLES% in it stay unexpanded.
        $current = [string]$key.GetValue('Path', '', [Microsoft.Win32.RegistryValueOptions]::DoNotExpandEnvironmentNames)
        $entries = @($current -split ';' | Where-Object { $_ -ne '' })
        foreach ($e in $entries) {
            if ([Environment]::ExpandEnvironmentVariables($e).TrimEnd('\') -ieq $Dir.TrimEnd('\')) {
                return $false
            }
        }
        $key.SetValue('Path', (($entries + $Dir) -join ';'), [Microsoft.Win32.RegistryValueKind]::ExpandString)
    } finally {
        $key.Close()
    }
    # Setting a user variable through .NET broadcasts WM_SETTINGCHANGE, so new terminals see the new PATH.
    [Environment]::SetEnvironmentVariable('AGENT_RELAY_INSTALL_REFRESH', '1', 'User')
    [Environment]::SetEnvironmentVariable('AGENT_RELAY_INSTALL_REFRESH', $null, 'User')
    return $true
}

function Invoke-AgentRelay([string]$Python, [string]$Script, [string[]]$Arguments) {
    & $Python $Script @Arguments
    if ($LASTEXITCODE -ne 0) {
        throw "'agent-relay $($Arguments -join ' ')' failed (exit code $LASTEXITCODE)"
    }
}

# Runs a native command and returns its exit code and its output (stdout and stderr).
function Invoke-AgentRelayNative([string]$Exe, [string[]]$Arguments) {
    # Windows PowerShell 5 turns redirected native stderr into a terminating error under 'Stop'.
    $ErrorActionPreference = 'Continue'
    $lines = @(& $Exe @Arguments 2>&1 | ForEach-Object { "$_" })
    return @{ Code = $LASTEXITCODE; Output = ($lines -join [Environment]::NewLine) }
}

function Install-AgentRelay([bool]$WithDaemon, [bool]$WithCodex) {
    $ErrorActionPreference = 'Stop'
    $ProgressPreference = 'SilentlyContinue'  # the progress bar makes Invoke-WebRequest very slow on PowerShell 5
    Set-StrictMode -Version 2

    $defaultSource = 'https://raw.githubusercontent.com/agent-relay/agent-relay/main/agent_relay.py'
    $source = $env:AGENT_RELAY_SOURCE
    if (-not $source) { $source = $defaultSource }
    if (-not $env:LOCALAPPDATA) { throw 'LOCALAPPDATA is not set' }
    $appDir = Join-Path $env:LOCALAPPDATA 'agent-relay'
    $bin = Join-Path $appDir 'bin'
    $dest = Join-Path $appDir 'agent_relay.py'
    $shim = Join-Path $bin 'agent-relay.cmd'

    $python = Find-AgentRelayPython
    Write-AgentRelayStep "using Python $($python.Version) ($($python.Path))"

    $work = Join-Path ([System.IO.Path]::GetTempPath()) ("agent-relay-" + [guid]::NewGuid().ToString('N'))
    New-Item -ItemType Directory -Path $work -Force | Out-Null
    $staged = $null
    try {
        Write-AgentRelayStep "fetching $source"
        $download = Join-Path $work 'agent_relay.py'
        Get-AgentRelaySource $source $download

        $check = Invoke-AgentRelayNative $python.Path @($download, '--version')
        $version = $check.Output
        if ($check.Code -ne 0) {
            Write-Host $version
            throw "the downloaded agent_relay.py does not run ('python agent_relay.py --version' failed); nothing was installed"
        }
        $version = $version.Trim()

        New-Item -ItemType Directory -Path $bin -Force | Out-Null
        # Stage next to the destination, then swap: the old copy is replaced in one step.
        $staged = "$dest.tmp-$PID"
        Copy-Item -LiteralPath $download -Destination $staged -Force
        Move-AgentRelayFile $staged $dest
        $staged = $null

        # The shim runs the discovered interpreter on the installed file; cmd files use the OEM code page.
        $shimText = '@"' + $python.Path + '" "%~dp0..\agent_relay.py" %*' + "`r`n"
        $oem = [System.Text.Encoding]::GetEncoding([System.Globalization.CultureInfo]::CurrentCulture.TextInfo.OEMCodePage)
        $shimTmp = "$shim.tmp-$PID"
        [System.IO.File]::WriteAllText($shimTmp, $shimText, $oem)
        Move-AgentRelayFile $shimTmp $shim
        Write-AgentRelayStep "installed $dest ($version)"
        Write-AgentRelayStep "installed $shim"
    } finally {
        if ($staged -and (Test-Path -LiteralPath $staged)) { Remove-Item -LiteralPath $staged -Force }
        Remove-Item -LiteralPath $work -Recurse -Force -ErrorAction SilentlyContinue
    }

    if (Add-AgentRelayUserPath $bin) {
        Write-AgentRelayStep "added $bin to your user PATH; open a new terminal to use 'agent-relay'"
    }
    $sessionPath = @($env:Path -split ';' | ForEach-Object { $_.TrimEnd('\') })
    if ($sessionPath -notcontains $bin.TrimEnd('\')) { $env:Path = "$env:Path;$bin" }

    if ($WithDaemon) {
        Write-AgentRelayStep 'running: agent-relay setup --yes'
        Invoke-AgentRelay $python.Path $dest @('setup', '--yes')
        Write-AgentRelayStep "running: agent-relay daemon install --binary $shim --enable --start --yes"
        Invoke-AgentRelay $python.Path $dest @('daemon', 'install', '--binary', $shim, '--enable', '--start', '--yes')
    }

    if ($WithCodex) {
        Write-AgentRelayStep 'running: agent-relay codex install --yes'
        Invoke-AgentRelay $python.Path $dest @('codex', 'install', '--yes')
    }

    Invoke-AgentRelay $python.Path $dest @('--version')
    if ($WithDaemon) {
        Write-AgentRelayStep "done: the relay runs in the background (dashboard: http://127.0.0.1:4850). Try: agent-relay --help"
    } else {
        Write-AgentRelayStep "done. Next: start the relay with 'agent-relay serve' (dashboard: http://127.0.0.1:4850), or run this installer with -Daemon to run it as a background service."
    }
}

if ($Help) {
    Show-AgentRelayUsage
    return
}
try {
    Install-AgentRelay $Daemon.IsPresent $Codex.IsPresent
} catch {
    $message = "agent-relay install: error: $($_.Exception.Message)"
    if ($PSCommandPath) {
        # Run as a file: report and exit non-zero.
        Write-Host $message -ForegroundColor Red
        exit 1
    }
    # Under `irm | iex` an exit would close the user's window: throw instead.
    throw $message
}
