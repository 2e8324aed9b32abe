/* hostile_names: a traced process that tries to write to the terminal of whoever reads
 * its trace. Per line read on stdin it sets its comm to a name with an ANSI escape
 * (prctl PR_SET_NAME), opens a path with ESC/BEL/CR/LF in it under DIR (ENOENT) and
 * connects to 127.0.0.1:PORT, opens a path at an unmapped address (EFAULT: nothing can
 * read it, the tracer must say so), then prints "done N". On EOF it re-executes itself (same
 * pid) with an argv holding a space and an escape, and that image exits 0.
 *
 * Usage: hostile_names DIR PORT */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define EVIL_COMM "tf\033[31mevil"
#define EVIL_NAME "\033[2J\033]0;pwned\007\r\nname"

int main(int argc, char **argv)
{
	char line[64], path[4096];
	struct sockaddr_in sa;
	int n = 0;

	if (argc == 3 && !strcmp(argv[2], "--exit"))
		return 0;  /* the re-executed image */
	if (argc != 3) {
		fprintf(stderr, "usage: hostile_names DIR PORT\n");
		return 2;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((unsigned short)atoi(argv[2]));
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	printf("pid %d\n", getpid());
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		int fd;

		n++;
		if (prctl(PR_SET_NAME, EVIL_COMM) != 0) {
			perror("prctl");
			return 1;
		}
		snprintf(path, sizeof(path), "%s/" EVIL_NAME "-%d", argv[1], n);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd >= 0 || errno != ENOENT) {
			fprintf(stderr, "open: expected ENOENT\n");
			return 1;
		}
		fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0) {
			perror("socket");
			return 1;
		}
		connect(fd, (struct sockaddr *)&sa, sizeof(sa));  /* refused or not: traced */
		close(fd);
		fd = open((const char *)8, O_RDONLY | O_CLOEXEC);  /* page 0: never mapped */
		if (fd >= 0 || errno != EFAULT) {
			fprintf(stderr, "open: expected EFAULT\n");
			return 1;
		}
		printf("done %d\n", n);
		fflush(stdout);
	}
	{
		char *const args[] = {"hostile_names", "a b\033[1m", "--exit", NULL};

		execv("/proc/self/exe", args);
		perror("execv");
		return 1;
	}
}
