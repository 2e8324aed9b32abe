/* cold_rodata: syscall arguments that live in .rodata pages nobody has touched yet.
 *
 * Each target object is 2 MiB aligned and 2 MiB long, so it owns a whole PMD-sized
 * block of the read-only segment (see COLD_ALIGN): nothing the loader, libc or this
 * program touches can map its page as a side effect. User space never reads the
 * targets; the kernel (the syscall itself) is the first to touch them, so at
 * sys_enter their PTEs are absent and a non-sleepable BPF read gets -EFAULT.
 *
 * Usage: cold_rodata [MODE] [--hold-ms N]
 *   MODE: openat (default) | einval | openat2 | connect | connect6 | connect_unix | exec
 * See tests/workloads/README.md for the JSON line and the expected results. */
#include "workload.h"

#include <arpa/inet.h>
#include <linux/openat2.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>

/* 2 MiB (PMD) per object, not just one 64 KiB fault-around window: since 6.18
 * filemap_map_pages() maps a whole large page-cache folio (up to PMD size, never
 * crossing a PMD) whenever fault-around hits any part of it, and ext4 caches
 * executables in large folios. Folios are naturally aligned, so an object that owns
 * its whole 2 MiB-aligned block cannot share a folio with anything touched. */
#define COLD_ALIGN (2UL << 20)
#define COLD __attribute__((aligned(COLD_ALIGN), used))

/* Unique literal per mode so a test can match on the string. The warm copies used
 * for "expect" are built from the same macro, as separate objects. */
#define P_OPENAT WL_NOWHERE "/cold-rodata-openat"
#define P_EINVAL WL_NOWHERE "/cold-rodata-einval"
#define P_OPENAT2 WL_NOWHERE "/cold-rodata-openat2"
#define P_UNIX WL_NOWHERE "/cold-rodata-connect-unix.sock"
#define P_EXEC "/bin/true"
#define A_EXEC1 "--tf-arg-1"
#define A_EXEC2 "tf-arg-two"
#define PORT_DISCARD 9

#define HOW_INIT { .flags = O_RDONLY, .mode = 0, .resolve = RESOLVE_NO_SYMLINKS }
#define SIN_INIT { .sin_family = AF_INET, .sin_port = __builtin_bswap16(PORT_DISCARD), \
		   .sin_addr = { .s_addr = __builtin_bswap32(0x7f000001) } }
#define SIN6_INIT { .sin6_family = AF_INET6, .sin6_port = __builtin_bswap16(PORT_DISCARD), \
		    .sin6_addr = IN6ADDR_LOOPBACK_INIT }
#define SUN_INIT { .sun_family = AF_UNIX, .sun_path = P_UNIX }

/* The bare kernel bit: glibc's __O_TMPFILE already includes O_DIRECTORY. */
#define TF_O_TMPFILE_BIT 020000000

/* ---- cold targets: one 64 KiB window each, never read by user space ---- */
static const char cold_openat[COLD_ALIGN] COLD = P_OPENAT;
static const char cold_einval[COLD_ALIGN] COLD = P_EINVAL;
static const char cold_openat2[COLD_ALIGN] COLD = P_OPENAT2;
static const union { struct open_how how; char pad[COLD_ALIGN]; } cold_how COLD = { .how = HOW_INIT };
static const union { struct sockaddr_in sa; char pad[COLD_ALIGN]; } cold_sin COLD = { .sa = SIN_INIT };
static const union { struct sockaddr_in6 sa; char pad[COLD_ALIGN]; } cold_sin6 COLD = { .sa = SIN6_INIT };
static const union { struct sockaddr_un sa; char pad[COLD_ALIGN]; } cold_sun COLD = { .sa = SUN_INIT };
static const char cold_exec_file[COLD_ALIGN] COLD = P_EXEC;
static const char cold_exec_arg0[COLD_ALIGN] COLD = P_EXEC;
static const char cold_exec_arg1[COLD_ALIGN] COLD = A_EXEC1;
static const char cold_exec_arg2[COLD_ALIGN] COLD = A_EXEC2;
/* The pointer array needs load-time relocations (PIE), so it sits in .data.rel.ro
 * and is warm; only the strings it points at are cold. */
static char *const cold_exec_argv[] = {
	(char *)cold_exec_arg0, (char *)cold_exec_arg1, (char *)cold_exec_arg2, NULL,
};

/* ---- warm copies for "expect" (ordinary .rodata / stack) ---- */
static const char w_openat[] = P_OPENAT, w_einval[] = P_EINVAL, w_openat2[] = P_OPENAT2;
static const char w_exec[] = P_EXEC, w_arg1[] = A_EXEC1, w_arg2[] = A_EXEC2;

static int misaligned;

static void check_aligned(const void *p)
{
	if ((unsigned long)p % COLD_ALIGN)
		misaligned = 1;
}

static void do_connect(int family, const void *cold_sa, const void *warm_sa, socklen_t len,
		       const char *argname)
{
	struct wl_call *c;
	long r;
	int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		wl_die("socket");
	c = wl_prepare("connect", argname, cold_sa, warm_sa, len, 0);
	r = connect(fd, cold_sa, len);
	wl_done(c, r, errno);
	close(fd);
}

int main(int argc, char **argv)
{
	const char *mode = wl_parse_args(argc, argv, NULL);
	struct wl_call *c;
	long r;

	if (!mode)
		mode = "openat";

	if (!strcmp(mode, "openat")) {
		check_aligned(cold_openat);
		c = wl_prepare("openat", "pathname", cold_openat, w_openat, sizeof w_openat, 1);
		r = openat(AT_FDCWD, cold_openat, O_RDONLY | O_CLOEXEC);
		wl_done(c, r, errno);
	} else if (!strcmp(mode, "einval")) {
		/* O_TMPFILE bits without O_DIRECTORY: build_open_flags() rejects it with
		 * EINVAL before getname() ever reads the path. */
		check_aligned(cold_einval);
		c = wl_prepare("openat", "pathname", cold_einval, w_einval, sizeof w_einval, 1);
		r = syscall(SYS_openat, AT_FDCWD, cold_einval, TF_O_TMPFILE_BIT | O_RDWR, 0600);
		wl_done(c, r, errno);
	} else if (!strcmp(mode, "openat2")) {
		struct open_how w_how = HOW_INIT;
		struct wl_call *c2;

		check_aligned(cold_openat2);
		check_aligned(&cold_how);
		c = wl_prepare("openat2", "pathname", cold_openat2, w_openat2, sizeof w_openat2, 1);
		c2 = wl_prepare("openat2", "how", &cold_how.how, &w_how, sizeof w_how, 0);
		r = syscall(SYS_openat2, AT_FDCWD, cold_openat2, &cold_how.how, sizeof(struct open_how));
		wl_done(c, r, errno);
		wl_done(c2, r, errno);
	} else if (!strcmp(mode, "connect")) {
		struct sockaddr_in w = SIN_INIT;

		check_aligned(&cold_sin);
		do_connect(AF_INET, &cold_sin.sa, &w, sizeof w, "uservaddr");
	} else if (!strcmp(mode, "connect6")) {
		struct sockaddr_in6 w = SIN6_INIT;

		check_aligned(&cold_sin6);
		do_connect(AF_INET6, &cold_sin6.sa, &w, sizeof w, "uservaddr");
	} else if (!strcmp(mode, "connect_unix")) {
		struct sockaddr_un w = SUN_INIT;
		socklen_t len = offsetof(struct sockaddr_un, sun_path) + sizeof(P_UNIX);

		check_aligned(&cold_sun);
		do_connect(AF_UNIX, &cold_sun.sa, &w, len, "uservaddr");
	} else if (!strcmp(mode, "exec")) {
		/* execve replaces the process, so the JSON line is printed (and flushed)
		 * BEFORE the call, from the warm copies. ret/errno record the expected
		 * success; on failure we report on stderr and exit 1. */
		check_aligned(cold_exec_file);
		check_aligned(cold_exec_arg0);
		check_aligned(cold_exec_arg1);
		check_aligned(cold_exec_arg2);
		wl_prepare("execve", "filename", cold_exec_file, w_exec, sizeof w_exec, 1);
		wl_prepare("execve", "argv[0]", cold_exec_arg0, w_exec, sizeof w_exec, 1);
		wl_prepare("execve", "argv[1]", cold_exec_arg1, w_arg1, sizeof w_arg1, 1);
		wl_prepare("execve", "argv[2]", cold_exec_arg2, w_arg2, sizeof w_arg2, 1);
		wl_emit("cold_rodata", mode, misaligned ? "\"pre_exec\": true, \"aligned\": false"
							: "\"pre_exec\": true, \"aligned\": true");
		execve(cold_exec_file, cold_exec_argv, environ);
		wl_die("execve /bin/true");
	} else {
		fprintf(stderr, "usage: cold_rodata [openat|einval|openat2|connect|connect6|connect_unix|exec] [--hold-ms N]\n");
		return 2;
	}

	if (misaligned)
		fprintf(stderr, "cold_rodata: warning: a cold object is not %lu-byte aligned at run time\n",
			COLD_ALIGN);
	wl_emit("cold_rodata", mode, misaligned ? "\"aligned\": false" : "\"aligned\": true");
	wl_hold();
	return 0;
}
