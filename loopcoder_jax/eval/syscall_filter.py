"""A seccomp filter refusing the system calls a test program never needs (standard library only).

`install()` loads a classic-BPF program with prctl(PR_SET_SECCOMP) on the calling thread; it needs
no_new_privs set first and survives exec. Refused with EPERM: new namespaces (unshare, setns,
clone with a CLONE_NEW* flag), mounts of every kind (mount, umount2, pivot_root, chroot and the new
mount API), tracing and reading other processes (ptrace, process_vm_*, pidfd_getfd, kcmp),
kernel-extension and administration calls (bpf, perf_event_open, module and kexec loading, keyrings,
swap, reboot, quotas, acct, syslog, io ports), handle-based opens, userfaultfd, io_uring (which
would run calls this filter never sees) and execveat (no exec of a memfd: only execve of a path,
and nothing writable is mounted exec). clone3 answers ENOSYS, as container runtimes do: its flags
are in memory a filter cannot read, and libc then falls back to clone, whose flags it can. Calls of
another ABI (x32, or a foreign architecture) kill the process.
"""

import ctypes
import errno
import os
import struct

# x86_64 only for now: on other architectures the filter is missing, and the sandbox says so
_ARCH = {"x86_64": 0xC000003E}  # AUDIT_ARCH_X86_64
_X32_BIT = 0x40000000
_CLONE = 56
_CLONE3 = 435
_DENIED = {
    "unshare": 272,
    "setns": 308,
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "pidfd_getfd": 438,
    "kcmp": 312,
    "bpf": 321,
    "perf_event_open": 298,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "kexec_load": 246,
    "kexec_file_load": 320,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "quotactl": 179,
    "acct": 163,
    "syslog": 103,
    "iopl": 172,
    "ioperm": 173,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "userfaultfd": 323,
    "execveat": 322,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
}
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET (CLONE_NEWTIME, 0x80,
# shares clone()'s exit-signal bits and is only accepted by unshare and clone3)
_CLONE_NEW = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000
_CLONE_NEW |= 0x10000000 | 0x20000000 | 0x40000000

# classic BPF
_LD_W_ABS, _JEQ_K, _JSET_K, _JGE_K, _RET_K = 0x20, 0x15, 0x45, 0x35, 0x06
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_RET_KILL_PROCESS = 0x80000000
# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR, _ARCH_OFFSET, _ARG0_LOW = 0, 4, 16  # args[0]'s low word (little-endian)
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2


class Unavailable(Exception):
  """No filter can be installed here (architecture, or a kernel without seccomp filters)."""


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
  return struct.pack("=HBBI", code, jt, jf, k)


def program(arch: str) -> bytes:
  """The filter for `arch` (platform.machine()) as packed sock_filter instructions."""
  if arch not in _ARCH:
    raise Unavailable(f"no system-call table for {arch}")
  eperm = _RET_ERRNO | errno.EPERM
  out = [
      _insn(_LD_W_ABS, _ARCH_OFFSET),
      _insn(_JEQ_K, _ARCH[arch], 1, 0),
      _insn(_RET_K, _RET_KILL_PROCESS),
      _insn(_LD_W_ABS, _NR),
      _insn(_JGE_K, _X32_BIT, 0, 1),
      _insn(_RET_K, _RET_KILL_PROCESS),
      _insn(_JEQ_K, _CLONE3, 0, 1),
      _insn(_RET_K, _RET_ERRNO | errno.ENOSYS),
      # clone: refused when its flags ask for a new namespace
      _insn(_JEQ_K, _CLONE, 0, 4),
      _insn(_LD_W_ABS, _ARG0_LOW),
      _insn(_JSET_K, _CLONE_NEW, 0, 1),
      _insn(_RET_K, eperm),
      _insn(_RET_K, _RET_ALLOW),
  ]
  for nr in sorted(_DENIED.values()):
    out += [_insn(_JEQ_K, nr, 0, 1), _insn(_RET_K, eperm)]
  out.append(_insn(_RET_K, _RET_ALLOW))
  return b"".join(out)


class _SockFprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def install() -> None:
  """Filters this thread and everything it execs or forks; no_new_privs must be set already."""
  code = program(os.uname().machine)
  prog = _SockFprog(len(code) // 8, code)
  libc = ctypes.CDLL(None, use_errno=True)
  libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
  if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog)) != 0:
    err = ctypes.get_errno()
    raise Unavailable(f"prctl(PR_SET_SECCOMP): {errno.errorcode.get(err, err)}")
