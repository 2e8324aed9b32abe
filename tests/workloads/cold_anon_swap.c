/* cold_anon_swap: openat() on path strings in anonymous memory that has been pushed
 * out to swap with madvise(MADV_PAGEOUT). At sys_enter the PTE holds a swap entry
 * (not present), so a non-sleepable read fails; the kernel swaps the page back in.
 *
 * Only meaningful with swap: if /proc/swaps lists no device, the JSON line carries
 * "skip": "no swap configured" and an empty "calls" list, and the exit status is 0.
 *
 * Usage: cold_anon_swap [--count N] [--hold-ms N] */
#include "workload.h"

#include <sys/mman.h>

static long opt_count = 8;

static int other_opt(int argc, char **argv, int i)
{
	if (!strcmp(argv[i], "--count") && i + 1 < argc) {
		opt_count = wl_parse_long(argv[i + 1], "--count");
		return 2;
	}
	return 0;
}

static int swap_configured(void)
{
	char line[512];
	int n = 0;
	FILE *f = fopen("/proc/swaps", "re");

	if (!f)
		return 0;
	while (fgets(line, sizeof line, f))
		n++;
	fclose(f);
	return n > 1; /* first line is the header */
}

int main(int argc, char **argv)
{
	long psz = sysconf(_SC_PAGESIZE);
	char extra[128], **warm;
	size_t size, i;
	char *mem;
	int tries, swapped = 0;

	if (wl_parse_args(argc, argv, other_opt))
		wl_usage_die("cold_anon_swap takes no mode");
	if (opt_count < 1 || opt_count > WL_MAX_CALLS)
		wl_usage_die("--count must be 1..512");
	if (!swap_configured()) {
		wl_emit("cold_anon_swap", "openat", "\"skip\": \"no swap configured\"");
		return 0;
	}

	/* One string per page; no THP/mTHP so each page is paged out on its own. A kernel
	 * built without THP (the 6.12 guest) has no huge pages to avoid and refuses the
	 * advice with EINVAL: only that case is let through. */
	size = (size_t)opt_count * psz;
	mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		wl_die("mmap");
	if (madvise(mem, size, MADV_NOHUGEPAGE) &&
	    (errno != EINVAL || !access("/sys/kernel/mm/transparent_hugepage", F_OK)))
		wl_die("madvise(MADV_NOHUGEPAGE)");
	warm = calloc(opt_count, sizeof *warm);
	if (!warm)
		wl_die("calloc");
	for (i = 0; i < (size_t)opt_count; i++) {
		if (asprintf(&warm[i], WL_NOWHERE "/cold-anon-swap-%d-%03zu",
			     (int)getpid(), i) < 0)
			wl_die("asprintf");
		memcpy(mem + i * psz, warm[i], strlen(warm[i]) + 1);
	}

	/* Page out; retry a few times (pages under writeback or locked are skipped). */
	for (tries = 0; tries < 5; tries++) {
		int s;

		if (madvise(mem, size, MADV_PAGEOUT))
			wl_die("madvise(MADV_PAGEOUT)");
		for (i = 0, swapped = 0; i < (size_t)opt_count; i++)
			swapped += wl_pte_state((unsigned long)(mem + i * psz), &s) == 0;
		if (swapped == opt_count)
			break;
		usleep(10000);
	}

	for (i = 0; i < (size_t)opt_count; i++) {
		const char *cold = mem + i * psz;
		struct wl_call *c = wl_prepare("openat", "pathname", cold, warm[i],
					       strlen(warm[i]) + 1, 1);
		long r = openat(AT_FDCWD, cold, O_RDONLY | O_CLOEXEC);

		wl_done(c, r, errno);
		if (r >= 0)
			close(r);
	}

	snprintf(extra, sizeof extra, "\"paged_out\": %d", swapped);
	wl_emit("cold_anon_swap", "openat", extra);
	wl_hold();
	return 0;
}
