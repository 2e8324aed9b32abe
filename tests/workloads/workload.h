/* Shared helpers for the tracefleet cold-page workloads (tests/workloads/README.md).
 *
 * Every workload does its syscalls, then prints ONE JSON line on stdout:
 *   {"workload": "...", "pid": N, "mode": "...", "calls": [ {...}, ... ]}
 * and exits 0. Setup failures go to stderr with exit status 1 (2 for bad usage).
 *
 * Nothing in here ever dereferences the memory a call points at: the expected value
 * is always passed in from a separate (warm) copy, and residency is read from
 * /proc/self/pagemap, which inspects the page tables without touching the page. */
#ifndef TRACEFLEET_WORKLOAD_H
#define TRACEFLEET_WORKLOAD_H

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

/* The kernel's fault-around maps up to fault_around_bytes (default 64 KiB, aligned
 * window) of already-cached pages around any faulting address. A cold object must
 * own a whole aligned window, or a fault on a neighbour would map its page too. */
#define WL_COLD_WINDOW 65536
/* Largest page-cache folio (PMD): since 6.18 fault-around maps whole folios. */
#define WL_PMD_SIZE (2UL << 20)

/* Paths the workloads open that must never exist. procfs lets nobody create anything in
 * its root, so no user can plant a file or a socket there (under the world-writable /tmp
 * anyone could): the calls fail with ENOENT whoever runs alongside. */
#define WL_NOWHERE "/proc/tf-nonexistent-dir"

#define WL_MAX_CALLS 512
#define WL_MAX_PAGES 4

#define WL_UNUSED __attribute__((unused))

struct wl_call {
	const char *syscall;
	const char *arg;
	char *expect;        /* malloc'd: the string itself, or lowercase hex */
	const char *encoding; /* "string" or "hex" */
	size_t len;          /* bytes the kernel reads: strlen+1 for strings, sizeof for structs */
	long ret;
	int err;
	int npages;
	int present[WL_MAX_PAGES]; /* PTE present before the call: 1, 0, or -1 unknown */
	int swapped[WL_MAX_PAGES];
	unsigned long addr;
};

static struct wl_call wl_calls[WL_MAX_CALLS];
static int wl_ncalls;
static long wl_hold_ms;

static WL_UNUSED void wl_die(const char *what)
{
	fprintf(stderr, "workload setup failed: %s: %s\n", what, strerror(errno));
	exit(1);
}

static WL_UNUSED void wl_usage_die(const char *msg)
{
	fprintf(stderr, "usage error: %s\n", msg);
	exit(2);
}

static WL_UNUSED long wl_parse_long(const char *s, const char *opt)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end || end == s || v < 0) {
		fprintf(stderr, "usage error: %s needs a non-negative integer, got '%s'\n", opt, s);
		exit(2);
	}
	return v;
}

/* PTE state of the page holding addr via /proc/self/pagemap (bit 63 present,
 * bit 62 swapped). Returns 1/0, or -1 if pagemap is unreadable. Never touches addr. */
static WL_UNUSED int wl_pte_state(unsigned long addr, int *swapped)
{
	static int fd = -2;
	uint64_t ent;
	long psz = sysconf(_SC_PAGESIZE);

	*swapped = -1;
	if (fd == -2)
		fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	if (pread(fd, &ent, sizeof ent, (off_t)(addr / psz) * sizeof ent) != sizeof ent)
		return -1;
	*swapped = (int)((ent >> 62) & 1);
	return (int)((ent >> 63) & 1);
}

static WL_UNUSED char *wl_hex(const void *p, size_t n)
{
	static const char digits[] = "0123456789abcdef";
	const unsigned char *b = p;
	char *out = malloc(2 * n + 1);
	size_t i;

	if (!out)
		wl_die("malloc");
	for (i = 0; i < n; i++) {
		out[2 * i] = digits[b[i] >> 4];
		out[2 * i + 1] = digits[b[i] & 15];
	}
	out[2 * n] = '\0';
	return out;
}

/* Register a call BEFORE issuing it: records the expected bytes (from the caller's
 * warm copy `expect`/`expect_len`) and the PTE state of the target range
 * [target, target+len). Returns the slot; fill ret/err with wl_done() afterwards. */
static WL_UNUSED struct wl_call *wl_prepare(const char *syscall, const char *arg,
					    const void *target, const void *expect,
					    size_t len, int is_string)
{
	struct wl_call *c;
	long psz = sysconf(_SC_PAGESIZE);
	unsigned long a = (unsigned long)target, first, last, pg;

	if (wl_ncalls >= WL_MAX_CALLS) {
		fprintf(stderr, "workload setup failed: too many calls\n");
		exit(1);
	}
	c = &wl_calls[wl_ncalls++];
	c->syscall = syscall;
	c->arg = arg;
	c->addr = a;
	c->len = len;
	if (is_string) {
		c->encoding = "string";
		c->expect = strdup(expect);
		if (!c->expect)
			wl_die("strdup");
	} else {
		c->encoding = "hex";
		c->expect = wl_hex(expect, len);
	}
	first = a / psz;
	last = (a + (len ? len : 1) - 1) / psz;
	c->npages = 0;
	for (pg = first; pg <= last && c->npages < WL_MAX_PAGES; pg++, c->npages++)
		c->present[c->npages] = wl_pte_state(pg * psz, &c->swapped[c->npages]);
	c->ret = 0;
	c->err = 0;
	return c;
}

static WL_UNUSED void wl_done(struct wl_call *c, long ret, int err)
{
	c->ret = ret;
	c->err = ret < 0 ? err : 0;
}

static WL_UNUSED void wl_json_str(FILE *f, const char *s)
{
	fputc('"', f);
	for (; *s; s++) {
		unsigned char ch = (unsigned char)*s;

		if (ch == '"' || ch == '\\')
			fprintf(f, "\\%c", ch);
		else if (ch < 0x20 || ch >= 0x7f)
			fprintf(f, "\\u%04x", ch);
		else
			fputc(ch, f);
	}
	fputc('"', f);
}

static WL_UNUSED void wl_tristate(FILE *f, int v)
{
	fputs(v < 0 ? "null" : v ? "true" : "false", f);
}

/* The default data file of a workload: "$TMPDIR/tf-NAME-PID.dat" (P_tmpdir when TMPDIR
 * is unset), so a test's files land in its own temporary directory, wherever that is. The
 * name is printed in the JSON line unescaped, hence the character check. */
static WL_UNUSED char *wl_scratch_file(const char *name)
{
	const char *dir = getenv("TMPDIR"), *s;
	char *path;

	if (!dir || !*dir)
		dir = P_tmpdir;
	for (s = dir; *s; s++)
		if (*s == '"' || *s == '\\' || (unsigned char)*s < 0x20) {
			fprintf(stderr, "usage error: TMPDIR '%s' contains a quote, backslash or "
				"control character; set TMPDIR to a plain directory or pass --file\n",
				dir);
			exit(2);
		}
	if (asprintf(&path, "%s/tf-%s-%d.dat", dir, name, (int)getpid()) < 0)
		wl_die("asprintf");
	return path;
}

/* Print the JSON line. `extra` is either NULL or a pre-formatted fragment of extra
 * top-level members WITHOUT leading comma, e.g. "\"skip\": \"no swap configured\"". */
static WL_UNUSED void wl_emit(const char *workload, const char *mode, const char *extra)
{
	FILE *f = stdout;
	int i, j;

	fputs("{\"workload\": ", f);
	wl_json_str(f, workload);
	fprintf(f, ", \"pid\": %d, \"mode\": ", (int)getpid());
	wl_json_str(f, mode);
	fprintf(f, ", \"hold_ms\": %ld", wl_hold_ms);
	if (extra && *extra)
		fprintf(f, ", %s", extra);
	fputs(", \"calls\": [", f);
	for (i = 0; i < wl_ncalls; i++) {
		struct wl_call *c = &wl_calls[i];
		const char *en = c->err ? strerrorname_np(c->err) : NULL;

		fputs(i ? ", {" : "{", f);
		fputs("\"syscall\": ", f);
		wl_json_str(f, c->syscall);
		fputs(", \"arg\": ", f);
		wl_json_str(f, c->arg);
		fputs(", \"encoding\": ", f);
		wl_json_str(f, c->encoding);
		fputs(", \"expect\": ", f);
		wl_json_str(f, c->expect);
		fprintf(f, ", \"len\": %zu, \"addr\": \"0x%lx\", \"ret\": %ld, \"errno\": %d, \"errno_name\": ",
			c->len, c->addr, c->ret, c->err);
		if (en)
			wl_json_str(f, en);
		else
			fputs("null", f);
		fputs(", \"pte_present\": [", f);
		for (j = 0; j < c->npages; j++) {
			if (j)
				fputs(", ", f);
			wl_tristate(f, c->present[j]);
		}
		fputs("], \"swapped\": [", f);
		for (j = 0; j < c->npages; j++) {
			if (j)
				fputs(", ", f);
			wl_tristate(f, c->swapped[j]);
		}
		fputs("]}", f);
	}
	fputs("]}\n", f);
	if (fflush(f) != 0)
		wl_die("fflush stdout");
}

/* mmap(PROT_READ, MAP_PRIVATE) of fd at a virtual address aligned to `align`, so
 * that file offsets and fault-around windows / folio boundaries line up. */
static WL_UNUSED void *wl_mmap_file_aligned(int fd, size_t size, size_t align)
{
	char *res, *aligned;
	void *p;

	res = mmap(NULL, size + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (res == MAP_FAILED)
		wl_die("mmap reserve");
	aligned = (char *)(((unsigned long)res + align - 1) & ~(unsigned long)(align - 1));
	if (aligned > res)
		munmap(res, aligned - res);
	if (aligned + size < res + size + align)
		munmap(aligned + size, res + size + align - (aligned + size));
	p = mmap(aligned, size, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
	if (p == MAP_FAILED)
		wl_die("mmap data file");
	return p;
}

static WL_UNUSED void wl_hold(void)
{
	struct timespec ts;

	if (wl_hold_ms <= 0)
		return;
	ts.tv_sec = wl_hold_ms / 1000;
	ts.tv_nsec = (wl_hold_ms % 1000) * 1000000L;
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

/* Generic option scan: handles --hold-ms N; hands every other option to `other`
 * (returns how many argv entries it consumed, 0 = unknown option). Returns the
 * first positional argument (the mode) or NULL. */
static WL_UNUSED const char *wl_parse_args(int argc, char **argv,
					   int (*other)(int argc, char **argv, int i))
{
	const char *mode = NULL;
	int i, n;

	for (i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--hold-ms")) {
			if (i + 1 >= argc)
				wl_usage_die("--hold-ms needs a value");
			wl_hold_ms = wl_parse_long(argv[++i], "--hold-ms");
		} else if (!strncmp(argv[i], "--", 2)) {
			n = other ? other(argc, argv, i) : 0;
			if (n <= 0) {
				fprintf(stderr, "usage error: unknown option %s\n", argv[i]);
				exit(2);
			}
			i += n - 1;
		} else if (!mode) {
			mode = argv[i];
		} else {
			fprintf(stderr, "usage error: unexpected argument %s\n", argv[i]);
			exit(2);
		}
	}
	return mode;
}

#endif
