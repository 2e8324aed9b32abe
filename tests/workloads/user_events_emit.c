/* user_events_emit: a user_events producer for the tests (not a cold-page workload).
 *
 * Registers `tf_test u32 count; char[16] msg` through user_events_data (DIAG_IOCSREG,
 * enable bit 31 of a word in this process), prints one JSON line
 *   {"workload": "user_events_emit", "pid": N, "event": "tf_test", "write_index": I, "bit": B}
 * then obeys commands on stdin, one per line, answering each with one JSON line:
 *   wait 0|1 [TIMEOUT_MS]  poll the word until the bit has that value:
 *                          {"bit": B, "t_ns": CLOCK_MONOTONIC of the change, "timeout": false}
 *   emit N                 writev N events (count = 0..N-1, msg = "msg-<count>") if the bit is
 *                          set: {"emitted": K, "skipped": N-K, "bit": B}
 *   quit                   exit 0
 * Exit 1: the kernel refused (no user_events: message on stderr), 2: usage. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/types.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* From <linux/user_events.h> (6.4+), inlined: build hosts may have older headers. */
struct tf_user_reg {
	__u32 size;
	__u8 enable_bit;
	__u8 enable_size;
	__u16 flags;
	__u64 enable_addr;
	__u64 name_args;
	__u32 write_index;
} __attribute__((__packed__));
#define TF_DIAG_IOCSREG _IOWR('*', 0, struct tf_user_reg *)

#define EVENT "tf_test"
#define FORMAT EVENT " u32 count; char[16] msg"
#define BIT 31

static volatile uint32_t enabled; /* written by the kernel */

static long long mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int bit(void)
{
	return (enabled >> BIT) & 1;
}

int main(void)
{
	struct tf_user_reg reg = {0};
	char line[128];
	int fd = open("/sys/kernel/tracing/user_events_data", O_RDWR | O_CLOEXEC);

	if (fd < 0) {
		fprintf(stderr, "user_events_emit: open /sys/kernel/tracing/user_events_data: %s "
			"(kernel without CONFIG_USER_EVENTS, or tracefs not mounted)\n", strerror(errno));
		return 1;
	}
	reg.size = sizeof(reg);
	reg.enable_bit = BIT;
	reg.enable_size = sizeof(enabled);
	reg.enable_addr = (uintptr_t)&enabled;
	reg.name_args = (uintptr_t)FORMAT;
	if (ioctl(fd, TF_DIAG_IOCSREG, &reg) < 0) {
		fprintf(stderr, "user_events_emit: DIAG_IOCSREG '%s': %s\n", FORMAT, strerror(errno));
		return 1;
	}
	printf("{\"workload\": \"user_events_emit\", \"pid\": %d, \"event\": \"%s\", "
	       "\"write_index\": %u, \"bit\": %d}\n", getpid(), EVENT, reg.write_index, bit());
	fflush(stdout);

	while (fgets(line, sizeof(line), stdin)) {
		long a = 0, b = 60000;
		if (sscanf(line, "wait %ld %ld", &a, &b) >= 1) {
			long long deadline = mono_ns() + b * 1000000LL, t;
			while ((t = mono_ns()) < deadline && bit() != !!a)
				sched_yield();
			printf("{\"bit\": %d, \"t_ns\": %lld, \"timeout\": %s}\n", bit(), t,
			       bit() == !!a ? "false" : "true");
		} else if (sscanf(line, "emit %ld", &a) == 1 && a >= 0) {
			long k = 0;
			for (long i = 0; i < a; i++) {
				__u32 count = (__u32)i;
				char msg[16] = {0};
				struct iovec io[3] = {
					{&reg.write_index, sizeof(reg.write_index)},
					{&count, sizeof(count)},
					{msg, sizeof(msg)},
				};
				if (!bit())
					continue;
				snprintf(msg, sizeof(msg), "msg-%u", (unsigned)count);
				if (writev(fd, io, 3) < 0) {
					fprintf(stderr, "user_events_emit: writev: %s\n", strerror(errno));
					return 1;
				}
				k++;
			}
			printf("{\"emitted\": %ld, \"skipped\": %ld, \"bit\": %d}\n", k, a - k, bit());
		} else if (!strncmp(line, "quit", 4)) {
			return 0;
		} else {
			fprintf(stderr, "user_events_emit: unknown command: %s", line);
			return 2;
		}
		fflush(stdout);
	}
	return 0;
}
