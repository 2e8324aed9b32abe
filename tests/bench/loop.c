/* tracefleet benchmark loop: repeat one syscall pattern for a fixed time, print JSON.
 *
 *   tf_bench_loop openat  PATH SECONDS   openat(PATH, O_RDONLY) + close   (file set)
 *   tf_bench_loop connect PORT SECONDS   connect() of a UDP socket to 127.0.0.1:PORT (net set)
 *   tf_bench_loop rate    PATH SECONDS [RATE]  openat of a missing PATH (ENOENT); with RATE,
 *                                        paced to RATE calls/s (sleeps between batches)
 *
 * Output (one line): {"mode": M, "iters": N, "ns": ELAPSED, "ns_per_iter": X, "cpu_ns": C}
 * (C: CPU time of the process, user + system).
 * The clock is read every 256 iterations; the binary name keeps comm = "tf_bench_loop". */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long clk_ns(clockid_t clk)
{
	struct timespec ts;
	clock_gettime(clk, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long now_ns(void)
{
	return clk_ns(CLOCK_MONOTONIC);
}

int main(int argc, char **argv)
{
	if (argc != 4 && argc != 5) {
		fprintf(stderr, "usage: %s openat|connect|rate PATH|PORT SECONDS [RATE]\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	long long budget = (long long)(atof(argv[3]) * 1e9);
	double rate = argc == 5 ? atof(argv[4]) : 0.0;
	long long iters = 0, t0, t1;
	int sock = -1;
	struct sockaddr_in sin;
	memset(&sin, 0, sizeof(sin));
	if (strcmp(mode, "connect") == 0) {
		sock = socket(AF_INET, SOCK_DGRAM, 0);
		if (sock < 0) {
			perror("socket");
			return 1;
		}
		sin.sin_family = AF_INET;
		sin.sin_port = htons((unsigned short)atoi(argv[2]));
		sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	} else if (strcmp(mode, "openat") == 0) {
		int fd = open(argv[2], O_RDONLY | O_CREAT, 0644);
		if (fd < 0) {
			perror(argv[2]);
			return 1;
		}
		close(fd);
	} else if (strcmp(mode, "rate") != 0) {
		fprintf(stderr, "unknown mode %s\n", mode);
		return 2;
	}
	long long c0 = clk_ns(CLOCK_PROCESS_CPUTIME_ID);
	t0 = now_ns();
	t1 = t0;
	while (t1 - t0 < budget) {
		for (int i = 0; i < 256; i++) {
			if (sock >= 0) {
				if (connect(sock, (struct sockaddr *)&sin, sizeof(sin)) != 0) {
					perror("connect");
					return 1;
				}
			} else {
				int fd = openat(AT_FDCWD, argv[2], O_RDONLY);
				if (fd >= 0)
					close(fd);
			}
		}
		iters += 256;
		t1 = now_ns();
		if (rate > 0) {
			long long due = t0 + (long long)((double)iters * 1e9 / rate);
			if (due > t1) {
				struct timespec ts = {(due - t1) / 1000000000LL, (due - t1) % 1000000000LL};
				nanosleep(&ts, NULL);
				t1 = now_ns();
			}
		}
	}
	long long cpu = clk_ns(CLOCK_PROCESS_CPUTIME_ID) - c0;
	printf("{\"mode\": \"%s\", \"iters\": %lld, \"ns\": %lld, \"ns_per_iter\": %.2f, "
	       "\"cpu_ns\": %lld}\n",
	       mode, iters, t1 - t0, (double)(t1 - t0) / (double)iters, cpu);
	return 0;
}
