#!/usr/bin/env python3
"""Runs a command under a seccomp filter that answers pidfd_getfd(2) with
EPERM, as the container runtimes' default profile (Kubernetes
`seccompProfile: RuntimeDefault`) does for a container without
CAP_SYS_PTRACE. Usage: deny_getfd.py -- <command> [args...]

Hand-written (ctypes and a six-instruction BPF program): no seccomp tool or
binding is installed on the test machines, and the filter is this small."""
import ctypes
import os
import platform
import struct
import sys

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
EPERM = 1


def ins(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    arch = ARCH.get(platform.machine())
    if not argv or arch is None:
        sys.exit(f"deny_getfd.py: usage: -- <command>; architecture {platform.machine()} not known")
    prog = b"".join([
        ins(0x20, 0, 0, 4),  # A = seccomp_data.arch
        ins(0x15, 0, 3, arch),  # another architecture: allow
        ins(0x20, 0, 0, 0),  # A = seccomp_data.nr
        ins(0x15, 0, 1, SYS_PIDFD_GETFD),
        ins(0x06, 0, 0, 0x00050000 | EPERM),  # SECCOMP_RET_ERRNO | EPERM
        ins(0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
    ])
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf), 0, 0) != 0:
        sys.exit(f"deny_getfd.py: prctl(PR_SET_SECCOMP): {os.strerror(ctypes.get_errno())}")
    os.execvp(argv[0], argv)


main()
