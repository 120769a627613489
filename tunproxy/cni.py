"""``tunproxy-cni``: flannel's CNI plugin for tunproxy hosts (link it as ``flannel`` in the CNI bin dir).

The container runtime runs this executable with ``CNI_COMMAND`` (ADD, DEL,
CHECK, VERSION) and the other ``CNI_*`` variables in the environment and the
network config on stdin (CNI spec). The plugin reads the subnet.env tunproxy
writes, builds a ``bridge`` + ``host-local`` config over this host's subnet
(``tunproxy.cniconf``), keeps it under ``dataDir/<container ID>``, and runs
the delegate found in ``CNI_PATH``, whose result it prints. Errors are the
spec's JSON error object on stdout, one line on stderr and exit status 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from .cniconf import (
    CURRENT_VERSION,
    DECODING_FAILURE,
    DEFAULT_SUBNET_FILE,
    INCOMPATIBLE_CNI_VERSION,
    INTERNAL,
    IO_FAILURE,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
    UNKNOWN_CONTAINER,
    CNIError,
    Invocation,
    NetConf,
    SubnetEnv,
    check_subnet,
    delegate_config,
    load_netconf,
    parse_environment,
    parse_stored,
    parse_subnet_env,
    plugin_name,
    replay_config,
    stored_config,
    version_info,
    version_tuple,
)

TUNPROXY_SUBNET_FILE = "/run/tunproxy/subnet.env"  # tunproxy run --subnet-file's default
ABOUT = (
    "tunproxy-cni: flannel's CNI plugin for tunproxy (delegates to bridge + host-local)\n"
    f"CNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}\n"
)


def read_subnet_env(path: Path) -> SubnetEnv:
    """Read and parse subnet.env; its absence is CNIError(11): the daemon writes it once it has a lease."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        # Linked as "flannel" with kube-flannel's config, the path is flannel's, not ours.
        hint = (
            f' (tunproxy writes {TUNPROXY_SUBNET_FILE}: set "subnetFile")'
            if str(path) == DEFAULT_SUBNET_FILE
            else ""
        )
        raise CNIError(
            TRY_AGAIN_LATER,
            f"{path} does not exist: is tunproxy running on this host?{hint}",
        ) from None
    except OSError as e:
        raise CNIError(IO_FAILURE, f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CNIError(DECODING_FAILURE, f"{path} is not UTF-8 text") from None
    return parse_subnet_env(text, str(path))


def find_plugin(name: str, cni_path: tuple[str, ...]) -> Path:
    """The executable ``name`` in the first CNI_PATH directory that has it; CNIError(999) if none does."""
    for directory in cni_path:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(INTERNAL, f'failed to find plugin "{name}" in path [{" ".join(cni_path)}]')


def invoke(plugin: Path, command: str, config: Mapping[str, Any], environ: Mapping[str, str]) -> bytes:
    """Run a delegate plugin with our environment and ``config`` on stdin; its stdout on success.

    Its error object is re-raised as CNIError with the delegate's code; its
    stderr goes to ours (the runtime's log).
    """
    env = dict(environ, CNI_COMMAND=command)
    try:
        proc = subprocess.run(
            [str(plugin)], input=json.dumps(config).encode(), stdout=subprocess.PIPE, env=env, check=False
        )
    except OSError as e:
        raise CNIError(INTERNAL, f"cannot run {plugin}: {e.strerror}") from None
    if proc.returncode == 0:
        return proc.stdout
    what = f"failed to delegate {command} to {plugin.name}"
    try:
        error = json.loads(proc.stdout)
        code, msg = int(error["code"]), str(error["msg"])
    except (ValueError, KeyError, TypeError):
        raise CNIError(
            INTERNAL, f"{what}: exit status {proc.returncode}", proc.stdout.decode(errors="replace").strip()
        ) from None
    raise CNIError(code, f"{what}: {msg}", str(error.get("details") or ""))


def _scratch(conf: NetConf, inv: Invocation) -> Path:
    return conf.data_dir / inv.container_id


def save_scratch(path: Path, config: Mapping[str, Any]) -> None:
    """Keep the delegate config for DEL/CHECK: 0600 in a 0700 dir, written whole or not at all."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        os.replace(tmp, path)
    except OSError as e:
        raise CNIError(IO_FAILURE, f"cannot store the delegate config in {path}: {e.strerror}") from None


def cmd_add(inv: Invocation, conf: NetConf, environ: Mapping[str, str]) -> bytes:
    """ADD: build the delegate config from subnet.env, store it, delegate; the delegate's result."""
    env = read_subnet_env(conf.subnet_file)
    config = delegate_config(conf, env)
    plugin = find_plugin(plugin_name(config["type"], "delegate type"), inv.path)
    # Look the IPAM plugin up too: a missing one is found now, before anything is stored or created.
    find_plugin(plugin_name(config["ipam"]["type"], "ipam type"), inv.path)
    save_scratch(_scratch(conf, inv), stored_config(config))
    result = invoke(plugin, "ADD", config, environ)
    try:
        json.loads(result)
    except ValueError:
        raise CNIError(
            INTERNAL, f"{plugin.name} ADD printed no JSON result", result.decode(errors="replace")
        ) from None
    return result


def _load_scratch(path: Path, err: TextIO) -> dict[str, Any] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CNIError(IO_FAILURE, f"cannot read {path}: {e.strerror}") from None
    try:
        return parse_stored(data, str(path))
    except CNIError as e:
        # Nothing can be undone with it; DEL must not fail forever because of it (flannel: same).
        err.write(f"tunproxy-cni: {e.msg}; ignored\n")
        return None


def cmd_del(inv: Invocation, conf: NetConf, environ: Mapping[str, str], err: TextIO) -> None:
    """DEL: delegate the stored config, then forget it. Nothing stored: success (already deleted)."""
    path = _scratch(conf, inv)
    stored = _load_scratch(path, err)
    if stored is not None:
        config = replay_config(stored, conf)
        invoke(find_plugin(plugin_name(config["type"], "delegate type"), inv.path), "DEL", config, environ)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def cmd_check(inv: Invocation, conf: NetConf, environ: Mapping[str, str], err: TextIO) -> None:
    """CHECK: the pod's subnet is still this host's, then the stored config's CHECK with prevResult.

    No record of the container is CNIError(3).
    """
    if version_tuple(conf.cni_version) < (0, 4, 0):
        raise CNIError(INCOMPATIBLE_CNI_VERSION, "config version does not allow CHECK")
    path = _scratch(conf, inv)
    stored = _load_scratch(path, err)
    if stored is None:
        raise CNIError(
            UNKNOWN_CONTAINER, f"no network config stored for container {inv.container_id} in {conf.data_dir}"
        )
    try:
        env = read_subnet_env(conf.subnet_file)
    except CNIError:
        env = None  # the daemon is restarting; that says nothing about this pod's own config
    if env is not None:
        check_subnet(stored, env)
    config = replay_config(stored, conf)
    invoke(find_plugin(plugin_name(config["type"], "delegate type"), inv.path), "CHECK", config, environ)


def run(environ: Mapping[str, str], stdin: bytes, out: TextIO, err: TextIO) -> int:
    """One plugin call: the exit status; the result or the error object written to ``out``."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        err.write(ABOUT)
        return 0
    cni_version = CURRENT_VERSION
    try:
        if command == "VERSION":
            out.write(json.dumps(version_info()))
            return 0
        inv = parse_environment(environ)
        conf = load_netconf(stdin)
        cni_version = conf.cni_version
        if command == "ADD":
            out.write(cmd_add(inv, conf, environ).decode())
        elif command == "DEL":
            cmd_del(inv, conf, environ, err)
        else:
            cmd_check(inv, conf, environ, err)
        return 0
    except CNIError as e:
        out.write(json.dumps(e.to_json(cni_version)))
        err.write(f"tunproxy-cni: error: {e.msg}\n")
        return 1
    except Exception as e:  # the runtime must get a CNI error object, never a traceback
        error = CNIError(INTERNAL, f"tunproxy-cni {command} failed: {type(e).__name__}: {e}")
        out.write(json.dumps(error.to_json(cni_version)))
        err.write(f"tunproxy-cni: error: {error.msg}\n")
        return 1


def main() -> None:
    """The ``tunproxy-cni`` console script: ``run`` on this process's environment, stdin and stdout."""
    command = os.environ.get("CNI_COMMAND", "")
    stdin = sys.stdin.buffer.read() if command and command != "VERSION" else b""
    code = run(os.environ, stdin, sys.stdout, sys.stderr)
    sys.stdout.flush()
    sys.exit(code)


__all__ = ["DEFAULT_SUBNET_FILE", "TUNPROXY_SUBNET_FILE", "main", "run"]

if __name__ == "__main__":
    main()
