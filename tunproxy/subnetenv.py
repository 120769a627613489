"""subnet.env: its text, its atomic write, its lock, a write that never stops forwarding, and
the subnet a previous run wrote there (the etcd registry asks for it back, as flannel does).

At start a subnet.env that cannot be written stops the daemon with one line
(nothing is running yet that depends on us). At run time (our lease
re-acquired, the subnet changed) the data path is already forwarding: a
write that fails is one log line naming the file and the reason, and the
periodic check tries again until it succeeds, which is logged too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path

from .logonce import Said
from .model import ConfigError

log = logging.getLogger("tunproxy")


def reason(error: OSError) -> str:
    """Why a write failed, in words: ``/run/x is not a directory``, ``Permission denied``."""
    if error.errno == errno.ENOTDIR and error.filename:
        return f"{error.filename} is not a directory"
    return error.strerror or str(error)


class SubnetEnv:
    """The subnet.env text waiting to be written to ``path`` with ``write(path, text)``."""

    def __init__(self, path: Path, write: Callable[[Path, str], None]) -> None:
        self.path = path
        self._write = write
        self._pending: str | None = None
        self._failure = Said()  # the reason last logged, so a retry does not repeat it

    def set(self, text: str, fatal: bool) -> None:
        """Write ``text`` now; ``fatal``: raise OSError on failure, else log it and keep it pending."""
        self._pending = text
        self.flush(fatal)

    def flush(self, fatal: bool = False) -> None:
        """Write the pending text, if any (the periodic check calls this)."""
        if self._pending is None:
            return
        try:
            self._write(self.path, self._pending)
        except OSError as e:
            if fatal:
                raise
            if self._failure.due("write", reason(e)):
                log.error(
                    "cannot write the subnet file %s: %s; still forwarding, retrying at each check",
                    self.path,
                    reason(e),
                )
            return
        if "write" in self._failure:
            log.info("wrote the subnet file %s", self.path)
            self._failure.forget("write")
        self._pending = None


def subnet_env(network: IPv4Network, subnet: IPv4Network, mtu: int, ipmasq: bool) -> str:
    """flannel's subnet.env: FLANNEL_SUBNET is the subnet's first host address with its length."""
    first = subnet.network_address + 1
    return (
        f"FLANNEL_NETWORK={network}\n"
        f"FLANNEL_SUBNET={first}/{subnet.prefixlen}\n"
        f"FLANNEL_MTU={mtu}\n"
        f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}\n"
    )


def write_subnet_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers never see half a file.

    The temporary file has a unique name (mkstemp in the same directory), so
    two daemons sharing a filesystem never write through the same one.
    Raises OSError naming the path (NotADirectoryError when the directory is a file).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # mkdir's answer when the directory's name is taken by a file
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def previous_subnet(text: str) -> IPv4Network | None:
    """The subnet named by a subnet.env's ``FLANNEL_SUBNET=10.100.5.1/24`` (-> 10.100.5.0/24)."""
    for line in text.splitlines():
        name, sep, value = line.strip().partition("=")
        if sep and name.strip() == "FLANNEL_SUBNET":
            try:
                iface = ipaddress.ip_interface(value.strip().strip("\"'"))
            except ValueError:
                return None
            return iface.network if isinstance(iface.network, IPv4Network) else None
    return None


def read_previous_subnet(path: Path | None) -> IPv4Network | None:
    """``previous_subnet`` of the file at ``path``; None, with one warning naming the file, if it
    cannot be read or names none (and silently if there is no path or no file)."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read the previous subnet file %s: %s", path, e.strerror)
        return None
    except UnicodeDecodeError:
        log.warning("previous subnet file %s is not UTF-8 text; ignoring it", path)
        return None
    subnet = previous_subnet(text)
    if subnet is None:
        log.warning("previous subnet file %s has no usable FLANNEL_SUBNET; ignoring it", path)
    return subnet


# struct flock from <fcntl.h> on Linux: l_type, l_whence, l_start, l_len, l_pid (and padding).
_FLOCK = struct.Struct("@hhqqi4x")


class SubnetFileLock:
    """An exclusive lock on ``<subnet file>.lock``, held while the daemon runs.

    A second daemon given the same subnet file (for instance the default
    one, by two hosts of a lab in network namespaces on one machine) would
    overwrite the first one's subnet.env; it is refused instead. The lock is
    a POSIX record lock, so the kernel names the holder's PID (F_GETLK) and
    drops the lock when the holder dies, however it dies.
    """

    def __init__(self, subnet_file: Path) -> None:
        self.subnet_file = subnet_file
        self.path = subnet_file.with_name(subnet_file.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; ConfigError naming the file and the holder's PID if another daemon has it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the directory {self.path.parent}: {e.strerror}") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"cannot open the lock file {self.path}: {e.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = self._holder(fd)
            os.close(fd)
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise ConfigError(f"cannot lock {self.path}: {e.strerror}") from None
            who = f"pid {holder}" if holder else "another process"
            raise ConfigError(
                f"subnet file {self.subnet_file} is in use by another tunproxy ({who}); "
                "give each daemon its own --subnet-file"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> int | None:
        with contextlib.suppress(OSError):
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            l_type, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
            if l_type != fcntl.F_UNLCK and pid > 0:
                return int(pid)
        return None

    def release(self) -> None:
        """Drop the lock, if held; the lock file stays for the next daemon."""
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock; the file stays for the next daemon
            self._fd = None
