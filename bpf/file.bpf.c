// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* tracefleet event set `file`: path-taking file syscalls, with the paths (and openat2's
 * struct open_how) captured by the strategy the agent chose for this kernel. */
#include "tracefleet/syscall_event.bpf.h"

#define SET TF_SET_FILE
#define NO TF_NOARG

TF_THREAD_EXIT(SET)

/*         name        nargs set  syscall          str0 str1 blob len out */
TF_SYSCALL(openat,     4,    SET, TF_SC_OPENAT,     1,  NO,  NO,  NO, false)
TF_SYSCALL(openat2,    4,    SET, TF_SC_OPENAT2,    1,  NO,  2,   3,  false)
TF_SYSCALL(creat,      2,    SET, TF_SC_CREAT,      0,  NO,  NO,  NO, false)
TF_SYSCALL(unlinkat,   3,    SET, TF_SC_UNLINKAT,   1,  NO,  NO,  NO, false)
TF_SYSCALL(renameat2,  5,    SET, TF_SC_RENAMEAT2,  1,  3,   NO,  NO, false)
TF_SYSCALL(mkdirat,    3,    SET, TF_SC_MKDIRAT,    1,  NO,  NO,  NO, false)
TF_SYSCALL(fchmodat,   3,    SET, TF_SC_FCHMODAT,   1,  NO,  NO,  NO, false)
TF_SYSCALL(truncate,   2,    SET, TF_SC_TRUNCATE,   0,  NO,  NO,  NO, false)
TF_SYSCALL(statx,      5,    SET, TF_SC_STATX,      1,  NO,  NO,  NO, false)
TF_SYSCALL(readlinkat, 4,    SET, TF_SC_READLINKAT, 1,  NO,  NO,  NO, false)
TF_SYSCALL(chdir,      1,    SET, TF_SC_CHDIR,      0,  NO,  NO,  NO, false)

#if defined(__TARGET_ARCH_x86)
/* Legacy entry points: glibc on x86-64 calls these for open(), mkdir(), unlink(), rmdir(),
 * rename(), chmod(), readlink(), and stat() (newfstatat). */
TF_SYSCALL(open,       3,    SET, TF_SC_OPEN,       0,  NO,  NO,  NO, false)
TF_SYSCALL(mkdir,      2,    SET, TF_SC_MKDIR,      0,  NO,  NO,  NO, false)
TF_SYSCALL(unlink,     1,    SET, TF_SC_UNLINK,     0,  NO,  NO,  NO, false)
TF_SYSCALL(rmdir,      1,    SET, TF_SC_RMDIR,      0,  NO,  NO,  NO, false)
TF_SYSCALL(rename,     2,    SET, TF_SC_RENAME,     0,  1,   NO,  NO, false)
TF_SYSCALL(chmod,      2,    SET, TF_SC_CHMOD,      0,  NO,  NO,  NO, false)
TF_SYSCALL(newfstatat, 4,    SET, TF_SC_NEWFSTATAT, 1,  NO,  NO,  NO, false)
TF_SYSCALL(readlink,   3,    SET, TF_SC_READLINK,   0,  NO,  NO,  NO, false)
#endif
