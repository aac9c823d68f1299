#!/usr/bin/env python3
"""Run a command with io_uring_setup refused by a seccomp filter (as a locked-down
container would), to test that sipd falls back to epoll and says why.

    python3 without_io_uring.py PROGRAM [ARGS...]
"""
import ctypes
import os
import struct
import sys

AUDIT_ARCH_X86_64 = 0xC000003E
NR_IO_URING_SETUP = 425  # x86_64
ENOSYS = 38
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2


def insn(code, jt, jf, k):
    return struct.pack("HBBI", code, jt, jf, k)


def main():
    if os.uname().machine != "x86_64":
        sys.exit("without_io_uring.py: only x86_64 syscall numbers are known")
    prog = b"".join([
        insn(BPF_LD_W_ABS, 0, 0, 4),                      # seccomp_data.arch
        insn(BPF_JEQ_K, 0, 3, AUDIT_ARCH_X86_64),         # other arch: allow
        insn(BPF_LD_W_ABS, 0, 0, 0),                      # seccomp_data.nr
        insn(BPF_JEQ_K, 0, 1, NR_IO_URING_SETUP),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | ENOSYS),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ])
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = struct.pack("HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        sys.exit("prctl(NO_NEW_PRIVS) failed: errno %d" % ctypes.get_errno())
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fbuf), 0, 0) != 0:
        sys.exit("prctl(SECCOMP) failed: errno %d" % ctypes.get_errno())
    os.execv(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
