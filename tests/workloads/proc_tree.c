/* proc_tree: a process tree of three generations below the root, some of it exec'ing, for
 * the process-tree follow (--pid P --follow).
 *
 *   proc_tree --tag T
 *
 * The root forks "g1-early" at once (a child born BEFORE a rule naming the root is set),
 * prints {"workload": "proc_tree", "pid": ROOT, "early": PID} and waits for a line on stdin
 * (the test sets its rule meanwhile). Then, every process opening WL_NOWHERE/T-<name>
 * (ENOENT) once:
 *   g0 (root) -> g1-early (released by the root)
 *             -> g1 -> g1-thread (a thread of g1)
 *                   -> g2-exec: exec()s this binary again, opens, then forks g3 (opens)
 *                   -> g2: opens, forks g3-exec which exec()s /bin/sh -c 'exec cat PATH'
 * Each process writes "<name> <pid> <ppid>" to a pipe the root reads after every process
 * ended; then one JSON line: {"procs": {name: [pid, ppid]}, "paths": {name: path}}. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "workload.h"

static const char *tag;
static int report_fd = -1;

static void die(const char *what)
{
	fprintf(stderr, "workload setup failed: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void path_of(char *buf, size_t n, const char *name)
{
	snprintf(buf, n, "%s/%s-%s", WL_NOWHERE, tag, name);
}

/* open our path (ENOENT), and report who we are */
static void act(const char *name)
{
	char path[256], line[128];
	int fd;

	path_of(path, sizeof(path), name);
	fd = open(path, O_RDONLY);
	if (fd >= 0)
		close(fd);
	int n = snprintf(line, sizeof(line), "%s %d %d\n", name, (int)getpid(), (int)getppid());
	if (write(report_fd, line, n) != n)
		die("write report");
}

static void *thread_main(void *arg)
{
	(void)arg;
	char path[256], line[128];
	path_of(path, sizeof(path), "g1-thread");
	int fd = open(path, O_RDONLY);
	if (fd >= 0)
		close(fd);
	int n = snprintf(line, sizeof(line), "g1-thread %d %d\n", (int)getpid(), (int)getppid());
	if (write(report_fd, line, n) != n)
		die("write report");
	return NULL;
}

static void wait_all(void)
{
	while (wait(NULL) > 0)
		;
}

/* exec'd again as: proc_tree --child g2-exec --tag T --report FD */
static int child_main(void)
{
	act("g2-exec");
	pid_t p = fork();
	if (p < 0)
		die("fork");
	if (p == 0) {
		act("g3");
		_exit(0);
	}
	wait_all();
	return 0;
}

int main(int argc, char **argv)
{
	const char *child = NULL;
	int gate[2], rep[2];

	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--tag"))
			tag = argv[i + 1];
		else if (!strcmp(argv[i], "--child"))
			child = argv[i + 1];
		else if (!strcmp(argv[i], "--report"))
			report_fd = atoi(argv[i + 1]);
		else {
			fprintf(stderr, "usage: proc_tree --tag T\n");
			return 2;
		}
	}
	if (!tag || strchr(tag, '/') || strlen(tag) > 64) {
		fprintf(stderr, "usage: proc_tree --tag T (no '/', at most 64 bytes)\n");
		return 2;
	}
	if (child)
		return child_main();

	if (pipe(gate) || pipe(rep))
		die("pipe");
	report_fd = rep[1];
	pid_t early = fork();
	if (early < 0)
		die("fork");
	if (early == 0) {
		char c;
		close(gate[1]);
		if (read(gate[0], &c, 1) < 0) /* EOF: released */
			die("read gate");
		act("g1-early");
		_exit(0);
	}
	close(gate[0]);
	printf("{\"workload\": \"proc_tree\", \"pid\": %d, \"early\": %d}\n", (int)getpid(),
	       (int)early);
	fflush(stdout);
	char go[16];
	if (!fgets(go, sizeof(go), stdin))
		die("read stdin");

	act("g0");
	close(gate[1]); /* release g1-early */
	pid_t g1 = fork();
	if (g1 < 0)
		die("fork");
	if (g1 == 0) {
		pthread_t th;
		act("g1");
		if (pthread_create(&th, NULL, thread_main, NULL) || pthread_join(th, NULL))
			die("thread");
		if (fork() == 0) {
			char fd[16];
			snprintf(fd, sizeof(fd), "%d", report_fd);
			execl("/proc/self/exe", "proc_tree", "--child", "g2-exec", "--tag", tag,
			      "--report", fd, (char *)NULL);
			die("exec self");
		}
		if (fork() == 0) {
			act("g2");
			if (fork() == 0) {
				char path[256], cmd[300], line[128];
				path_of(path, sizeof(path), "g3-exec");
				int n = snprintf(line, sizeof(line), "g3-exec %d %d\n", (int)getpid(),
						 (int)getppid());
				if (write(report_fd, line, n) != n)
					die("write report");
				snprintf(cmd, sizeof(cmd), "exec cat %s 2>/dev/null", path);
				execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
				die("exec sh");
			}
			wait_all();
			_exit(0);
		}
		wait_all();
		_exit(0);
	}
	close(rep[1]);
	wait_all();

	/* every writer has exited: read the reports to EOF */
	char buf[8192];
	size_t len = 0;
	ssize_t n;
	while ((n = read(rep[0], buf + len, sizeof(buf) - 1 - len)) > 0)
		len += n;
	buf[len] = 0;
	printf("{\"procs\": {");
	int first = 1;
	for (char *line = strtok(buf, "\n"); line; line = strtok(NULL, "\n")) {
		char name[32];
		int pid, ppid;
		if (sscanf(line, "%31s %d %d", name, &pid, &ppid) != 3)
			continue;
		printf("%s\"%s\": [%d, %d]", first ? "" : ", ", name, pid, ppid);
		first = 0;
	}
	printf("}, \"prefix\": \"%s/%s-\"}\n", WL_NOWHERE, tag);
	return 0;
}
