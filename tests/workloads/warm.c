/* warm: the control case. The same syscalls as cold_rodata, but every argument is
 * in a stack buffer the program has just written, so all pages are resident and a
 * non-sleepable BPF read must capture 100%.
 *
 * Usage: warm [MODE] [--port N] [--hold-ms N]
 *   MODE: openat (default) | einval | openat2 | connect | connect6 | connect_unix | exec
 *   --port N: port for connect/connect6 (default 9, discard: ECONNREFUSED) */
#include "workload.h"

#include <arpa/inet.h>
#include <linux/openat2.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>

#define TF_O_TMPFILE_BIT 020000000

static long opt_port = 9;

static int other_opt(int argc, char **argv, int i)
{
	if (!strcmp(argv[i], "--port") && i + 1 < argc) {
		opt_port = wl_parse_long(argv[i + 1], "--port");
		if (opt_port > 65535)
			wl_usage_die("--port must be 0..65535");
		return 2;
	}
	return 0;
}

static void do_connect(int family, const void *sa, socklen_t len)
{
	struct wl_call *c;
	long r;
	int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		wl_die("socket");
	c = wl_prepare("connect", "uservaddr", sa, sa, len, 0);
	r = connect(fd, sa, len);
	wl_done(c, r, errno);
	close(fd);
}

int main(int argc, char **argv)
{
	const char *mode = wl_parse_args(argc, argv, other_opt);
	char path[256];
	struct wl_call *c;
	long r;

	if (!mode)
		mode = "openat";

	if (!strcmp(mode, "openat")) {
		strcpy(path, WL_NOWHERE "/warm-openat");
		c = wl_prepare("openat", "pathname", path, path, strlen(path) + 1, 1);
		r = openat(AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
		wl_done(c, r, errno);
	} else if (!strcmp(mode, "einval")) {
		strcpy(path, WL_NOWHERE "/warm-einval");
		c = wl_prepare("openat", "pathname", path, path, strlen(path) + 1, 1);
		r = syscall(SYS_openat, AT_FDCWD, path, TF_O_TMPFILE_BIT | O_RDWR, 0600);
		wl_done(c, r, errno);
	} else if (!strcmp(mode, "openat2")) {
		struct open_how how;
		struct wl_call *c2;

		memset(&how, 0, sizeof how);
		how.flags = O_RDONLY;
		how.resolve = RESOLVE_NO_SYMLINKS;
		strcpy(path, WL_NOWHERE "/warm-openat2");
		c = wl_prepare("openat2", "pathname", path, path, strlen(path) + 1, 1);
		c2 = wl_prepare("openat2", "how", &how, &how, sizeof how, 0);
		r = syscall(SYS_openat2, AT_FDCWD, path, &how, sizeof how);
		wl_done(c, r, errno);
		wl_done(c2, r, errno);
	} else if (!strcmp(mode, "connect")) {
		struct sockaddr_in sa;

		memset(&sa, 0, sizeof sa);
		sa.sin_family = AF_INET;
		sa.sin_port = htons(opt_port);
		sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		do_connect(AF_INET, &sa, sizeof sa);
	} else if (!strcmp(mode, "connect6")) {
		struct sockaddr_in6 sa;

		memset(&sa, 0, sizeof sa);
		sa.sin6_family = AF_INET6;
		sa.sin6_port = htons(opt_port);
		sa.sin6_addr = in6addr_loopback;
		do_connect(AF_INET6, &sa, sizeof sa);
	} else if (!strcmp(mode, "connect_unix")) {
		struct sockaddr_un sa;
		static const char p[] = WL_NOWHERE "/warm-connect-unix.sock";

		memset(&sa, 0, sizeof sa);
		sa.sun_family = AF_UNIX;
		memcpy(sa.sun_path, p, sizeof p);
		do_connect(AF_UNIX, &sa, offsetof(struct sockaddr_un, sun_path) + sizeof p);
	} else if (!strcmp(mode, "exec")) {
		char file[32], a0[32], a1[32], a2[32];
		char *args[] = { a0, a1, a2, NULL };
		extern char **environ;

		strcpy(file, "/bin/true");
		strcpy(a0, "/bin/true");
		strcpy(a1, "--tf-arg-1");
		strcpy(a2, "tf-arg-two");
		wl_prepare("execve", "filename", file, file, strlen(file) + 1, 1);
		wl_prepare("execve", "argv[0]", a0, a0, strlen(a0) + 1, 1);
		wl_prepare("execve", "argv[1]", a1, a1, strlen(a1) + 1, 1);
		wl_prepare("execve", "argv[2]", a2, a2, strlen(a2) + 1, 1);
		wl_emit("warm", mode, "\"pre_exec\": true");
		execve(file, args, environ);
		wl_die("execve /bin/true");
	} else {
		fprintf(stderr, "usage: warm [openat|einval|openat2|connect|connect6|connect_unix|exec] [--port N] [--hold-ms N]\n");
		return 2;
	}

	wl_emit("warm", mode, NULL);
	wl_hold();
	return 0;
}
