// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* tracefleet event set `net`: socket syscalls with their socket address captured
 * (decoded for IPv4, IPv6 and unix in the agent). accept4's peer address is written by the
 * kernel, so it is read at exit. */
#include "tracefleet/syscall_event.bpf.h"

#define SET TF_SET_NET
#define NO TF_NOARG

TF_THREAD_EXIT(SET)

/*         name     nargs set  syscall        str0 str1 blob len out */
TF_SYSCALL(connect, 3,    SET, TF_SC_CONNECT, NO,  NO,  1,   2,  false)
TF_SYSCALL(bind,    3,    SET, TF_SC_BIND,    NO,  NO,  1,   2,  false)
TF_SYSCALL(accept4, 4,    SET, TF_SC_ACCEPT4, NO,  NO,  1,   2,  true)
TF_SYSCALL(sendto,  6,    SET, TF_SC_SENDTO,  NO,  NO,  4,   5,  false)
