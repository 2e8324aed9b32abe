/* Hostile-process workloads for the kernel-side hardening (tests/bpf/test_hardening.py).
 *
 * Every mode sets itself up, prints "ready" on stdout, waits for a line on stdin (the test
 * enables capture in between), does its calls and prints one JSON line.
 *
 *   park N FIFO       N threads (comm tf-parker) block in openat(FIFO) with no writer; once
 *                     every one is inside the call (read from /proc/self/task/T/syscall),
 *                     "parked" is printed and a line on stdin releases them all.
 *   pathrace FIFO DECOY
 *                     openat's path (FIFO) sits in a shared memfd page whose mapping was
 *                     dropped (MADV_DONTNEED), so a nofault read at entry faults; the open
 *                     blocks on the FIFO; a sibling rewrites the buffer to DECOY, then opens
 *                     the FIFO for writing, which lets the open return.
 *   sockrace SOCK DECOY
 *                     the same for connect's sockaddr: a unix stream listener with a full
 *                     backlog makes connect(SOCK) block; the sibling rewrites sun_path to
 *                     DECOY, then accepts, which lets the connect through.
 */
#include "workload.h"

#include <pthread.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>

#define MAX_THREADS 20000

static const char *fifo_path;
static int nparked_ok;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void wait_line(void)
{
	char buf[64];

	if (!fgets(buf, sizeof buf, stdin))
		wl_usage_die("stdin closed before the go line");
}

/* Syscall number a thread is blocked in, from /proc/self/task/TID/syscall; -1 if running. */
static long in_syscall(pid_t tid)
{
	char path[64], buf[64];
	long nr = -1;
	int fd;
	ssize_t n;

	snprintf(path, sizeof path, "/proc/self/task/%d/syscall", tid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof buf - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	if (sscanf(buf, "%ld", &nr) != 1)
		return -1;
	return nr;
}

static pid_t tids[MAX_THREADS];

static void *parker(void *arg)
{
	long i = (long)arg;
	int fd;

	tids[i] = (pid_t)syscall(SYS_gettid);
	prctl(PR_SET_NAME, "tf-parker");
	fd = openat(AT_FDCWD, fifo_path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		close(fd);
		pthread_mutex_lock(&mu);
		nparked_ok++;
		pthread_mutex_unlock(&mu);
	}
	return NULL;
}

static int park(long n)
{
	static pthread_t th[MAX_THREADS];
	pthread_attr_t attr;
	long parked = 0;
	int wfd;

	if (n < 1 || n > MAX_THREADS)
		wl_usage_die("park: thread count out of range (1..20000)");
	printf("ready\n");
	fflush(stdout);
	wait_line();
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 << 10);
	for (long i = 0; i < n; i++)
		if ((errno = pthread_create(&th[i], &attr, parker, (void *)i)))
			wl_die("pthread_create");
	/* every thread inside openat (blocked on the FIFO), not merely started; a thread once
	 * seen there stays until released, so each round checks only the others */
	static char seen[MAX_THREADS];
	while (parked < n) {
		for (long i = 0; i < n; i++)
			if (!seen[i] && tids[i] && in_syscall(tids[i]) == SYS_openat) {
				seen[i] = 1;
				parked++;
			}
		if (parked < n)
			usleep(10000);
	}
	printf("parked\n");
	fflush(stdout);
	wait_line();
	wfd = open(fifo_path, O_WRONLY | O_CLOEXEC); /* releases every reader */
	if (wfd < 0)
		wl_die("open fifo for writing");
	for (long i = 0; i < n; i++)
		pthread_join(th[i], NULL);
	close(wfd);
	printf("{\"workload\":\"harden\",\"mode\":\"park\",\"pid\":%d,\"threads\":%ld,"
	       "\"opened\":%d}\n", getpid(), n, nparked_ok);
	return 0;
}

/* A buffer in a shared memfd page, not mapped in this process (PTE dropped), holding s. */
static char *cold_buffer(int *mfd, const void *s, size_t len)
{
	long psz = sysconf(_SC_PAGESIZE);
	char *p;

	*mfd = memfd_create("tf-race", MFD_CLOEXEC);
	if (*mfd < 0 || ftruncate(*mfd, psz))
		wl_die("memfd");
	if (pwrite(*mfd, s, len, 0) != (ssize_t)len)
		wl_die("pwrite memfd");
	p = mmap(NULL, psz, PROT_READ | PROT_WRITE, MAP_SHARED, *mfd, 0);
	if (p == MAP_FAILED)
		wl_die("mmap memfd");
	if (madvise(p, psz, MADV_DONTNEED))
		wl_die("madvise");
	return p;
}

struct race {
	pid_t victim;    /* tid of the thread making the call */
	long nr;         /* the syscall it blocks in */
	int mfd;         /* memfd behind its argument */
	const void *decoy;
	size_t decoy_len;
	const char *fifo; /* pathrace: open for writing to release */
	int listener;     /* sockrace: accept to release */
};

static void *rewriter(void *arg)
{
	struct race *r = arg;
	int fd;

	while (in_syscall(r->victim) != r->nr)
		usleep(1000);
	/* the kernel has copied the argument and sleeps: change it behind its back */
	if (pwrite(r->mfd, r->decoy, r->decoy_len, 0) != (ssize_t)r->decoy_len)
		wl_die("rewrite");
	if (r->fifo) {
		fd = open(r->fifo, O_WRONLY | O_CLOEXEC);
		if (fd < 0)
			wl_die("open fifo for writing");
		/* kept open until exit: the reader's open has returned by then */
	} else {
		fd = accept(r->listener, NULL, NULL);
		if (fd < 0)
			wl_die("accept filler");
	}
	return NULL;
}

static int pathrace(const char *fifo, const char *decoy)
{
	struct race r = {.nr = SYS_openat, .decoy = decoy, .decoy_len = strlen(decoy) + 1};
	struct wl_call *c;
	pthread_t th;
	char *p;
	int fd;

	if (strlen(fifo) >= 200 || strlen(decoy) >= 200)
		wl_usage_die("pathrace: paths must be shorter than 200 bytes");
	p = cold_buffer(&r.mfd, fifo, strlen(fifo) + 1);
	r.victim = (pid_t)syscall(SYS_gettid);
	r.fifo = fifo;
	printf("ready\n");
	fflush(stdout);
	wait_line();
	c = wl_prepare("openat", "pathname", p, fifo, strlen(fifo) + 1, 1);
	if ((errno = pthread_create(&th, NULL, rewriter, &r)))
		wl_die("pthread_create");
	fd = openat(AT_FDCWD, p, O_RDONLY | O_CLOEXEC);
	wl_done(c, fd, errno);
	pthread_join(th, NULL);
	wl_emit("harden", "pathrace", NULL);
	return 0;
}

static int sockrace(const char *path, const char *decoy)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX}, da = {.sun_family = AF_UNIX};
	struct race r = {.nr = SYS_connect};
	struct wl_call *c;
	pthread_t th;
	int lfd, filler, cfd, rc;
	char *p;

	if (strlen(path) >= sizeof sa.sun_path || strlen(decoy) >= sizeof da.sun_path)
		wl_usage_die("sockrace: socket paths must be shorter than 108 bytes");
	strcpy(sa.sun_path, path);
	strcpy(da.sun_path, decoy);
	unlink(path);
	lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) || listen(lfd, 0))
		wl_die("listener");
	/* backlog 0: one pending connection fills it, the next connect blocks */
	filler = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (filler < 0 || connect(filler, (struct sockaddr *)&sa, sizeof sa))
		wl_die("filler connect");
	cfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (cfd < 0)
		wl_die("socket");
	p = cold_buffer(&r.mfd, &sa, sizeof sa);
	r.victim = (pid_t)syscall(SYS_gettid);
	r.decoy = &da;
	r.decoy_len = sizeof da;
	r.listener = lfd;
	printf("ready\n");
	fflush(stdout);
	wait_line();
	c = wl_prepare("connect", "addr", p, &sa, sizeof sa, 0);
	if ((errno = pthread_create(&th, NULL, rewriter, &r)))
		wl_die("pthread_create");
	rc = connect(cfd, (struct sockaddr *)p, sizeof sa);
	wl_done(c, rc, errno);
	pthread_join(th, NULL);
	unlink(path);
	wl_emit("harden", "sockrace", NULL);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdin, NULL, _IONBF, 0);
	if (argc == 4 && !strcmp(argv[1], "park")) {
		fifo_path = argv[3];
		return park(wl_parse_long(argv[2], "park N"));
	}
	if (argc == 4 && !strcmp(argv[1], "pathrace"))
		return pathrace(argv[2], argv[3]);
	if (argc == 4 && !strcmp(argv[1], "sockrace"))
		return sockrace(argv[2], argv[3]);
	wl_usage_die("harden park N FIFO | pathrace FIFO DECOY | sockrace SOCK DECOY");
	return 2;
}
