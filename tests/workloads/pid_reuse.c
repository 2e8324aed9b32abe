/* pid_reuse: a call whose argument the agent must read from user space, made by a process
 * whose pid is given to another process before the agent reads.
 *
 *   pid_reuse --mode reuse|alive [--gate PATH] [--hold-ms N]
 *
 * 1. openat(GATE) (ENOENT; a test's sink may hold the agent's consumer on this event, so the
 *    records behind it are read only once step 3 is done: the agent's lag, made certain).
 * 2. Child A maps a memfd page (never touched, so not present: a non-sleepable BPF read of it
 *    fails) at a fixed address holding CALLER_PATH and calls openat(CALLER_PATH): ENOENT.
 * 3. reuse: A exits, is reaped, and 30 ms later (past a clock tick, /proc's start-time unit)
 *    child B is created with A's pid (clone3 set_tid: root) and maps IMPOSTER_PATH at the
 *    same address. alive: A stays alive instead.
 * 4. One JSON line: {"workload", "pid", "mode", "caller_pid", "reused_pid" (B's pid or 0),
 *    "addr", "caller_path", "imposter_path", "ret", "errno"}; then holds (--hold-ms, or until
 *    stdin closes) so the agent can read, kills B / releases A, exits 0.
 * Exit 1: setup failed (stderr); with reuse, EEXIST from clone3 (another process took the
 * pid first) is a setup failure too. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "workload.h"

#define ADDR ((void *)0x6f0000000000UL)

static void die(const char *what)
{
	fprintf(stderr, "workload setup failed: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* A fresh memfd page holding s, mapped at ADDR and not touched (no PTE until a fault). */
static void map_cold(const char *s)
{
	long page = sysconf(_SC_PAGESIZE);
	int fd = memfd_create("tf-pid-reuse", 0);
	if (fd < 0)
		die("memfd_create");
	if (ftruncate(fd, page) || pwrite(fd, s, strlen(s) + 1, 0) != (ssize_t)strlen(s) + 1)
		die("memfd write");
	if (mmap(ADDR, page, PROT_READ, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0) != ADDR)
		die("mmap at the fixed address");
	close(fd);
}

int main(int argc, char **argv)
{
	const char *mode = NULL, *gate = NULL;
	long hold_ms = -1;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--mode") && i + 1 < argc)
			mode = argv[++i];
		else if (!strcmp(argv[i], "--gate") && i + 1 < argc)
			gate = argv[++i];
		else if (!strcmp(argv[i], "--hold-ms") && i + 1 < argc)
			hold_ms = atol(argv[++i]);
		else
			mode = NULL, i = argc;
	}
	if (!mode || (strcmp(mode, "reuse") && strcmp(mode, "alive"))) {
		fprintf(stderr, "usage: pid_reuse --mode reuse|alive [--gate PATH] [--hold-ms N]\n");
		return 2;
	}
	int reuse = !strcmp(mode, "reuse");
	char caller_path[128], imposter_path[128];
	snprintf(caller_path, sizeof(caller_path), WL_NOWHERE "/pid-reuse-caller-%d",
		 getpid());
	snprintf(imposter_path, sizeof(imposter_path), WL_NOWHERE "/tf-imposter-written-by-another-process");

	if (gate && openat(AT_FDCWD, gate, O_RDONLY) >= 0) {
		fprintf(stderr, "usage error: the gate path %s must not exist\n", gate);
		return 2;
	}
	int res[2], hold[2];
	if (pipe(res) || pipe(hold))
		die("pipe");
	pid_t a = fork();
	if (a < 0)
		die("fork");
	if (a == 0) {
		map_cold(caller_path);
		long r[2];
		r[0] = syscall(SYS_openat, AT_FDCWD, ADDR, O_RDONLY);
		r[1] = errno;
		if (write(res[1], r, sizeof(r)) != sizeof(r))
			_exit(1);
		if (!reuse) {
			char c;
			close(hold[1]);
			while (read(hold[0], &c, 1) > 0)
				;
		}
		_exit(0);
	}
	long r[2];
	if (read(res[0], r, sizeof(r)) != sizeof(r))
		die("read the caller's result");
	pid_t b = 0;
	int ready[2];
	if (pipe(ready))
		die("pipe");
	if (reuse) {
		if (waitpid(a, NULL, 0) != a)
			die("waitpid");
		struct timespec ts = {0, 30 * 1000 * 1000};
		nanosleep(&ts, NULL);
		pid_t want = a;
		struct clone_args ca;
		memset(&ca, 0, sizeof(ca));
		ca.exit_signal = SIGCHLD;
		ca.set_tid = (uint64_t)(uintptr_t)&want;
		ca.set_tid_size = 1;
		b = syscall(SYS_clone3, &ca, sizeof(ca));
		if (b < 0)
			die("clone3 with set_tid (needs root; EEXIST: the pid was taken)");
		if (b == 0) {
			map_cold(imposter_path);
			if (write(ready[1], "1", 1) != 1)
				_exit(1);
			for (;;)
				pause();
		}
		char c;
		if (read(ready[0], &c, 1) != 1)
			die("wait for the reused pid's process");
	}
	close(hold[0]);
	printf("{\"workload\": \"pid_reuse\", \"pid\": %d, \"mode\": \"%s\", \"caller_pid\": %d, "
	       "\"reused_pid\": %d, \"addr\": \"%p\", \"caller_path\": \"%s\", "
	       "\"imposter_path\": \"%s\", \"ret\": %ld, \"errno\": %ld}\n",
	       getpid(), mode, a, b, ADDR, caller_path, imposter_path, r[0], r[1]);
	fflush(stdout);
	if (hold_ms >= 0) {
		struct timespec ts = {hold_ms / 1000, (hold_ms % 1000) * 1000000L};
		nanosleep(&ts, NULL);
	} else {
		char buf[64];
		while (read(0, buf, sizeof(buf)) > 0)
			;
	}
	if (b > 0) {
		kill(b, SIGKILL);
		waitpid(b, NULL, 0);
	} else {
		close(hold[1]);
		waitpid(a, NULL, 0);
	}
	return 0;
}
