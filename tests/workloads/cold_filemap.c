/* cold_filemap: openat() on path strings read straight out of a private file mapping
 * whose pages have never been faulted in and are not even in the page cache.
 *
 * 1. write a fresh data file holding --count NUL-terminated paths, one every 64 KiB
 *    (one fault-around window each), fsync it;
 * 2. posix_fadvise(POSIX_FADV_DONTNEED) to drop its page cache (optionally also
 *    --drop-caches: echo 1 > /proc/sys/vm/drop_caches, root only);
 * 3. mmap(MAP_PRIVATE, PROT_READ) + madvise(MADV_RANDOM): no readahead, so a fault
 *    reads exactly one order-0 page and fault-around finds no cached neighbour;
 * 4. openat() each string straight from the mapping (nonexistent paths: ENOENT).
 * The expected strings come from the heap buffer the file was written from.
 *
 * Usage: cold_filemap [--file PATH] [--count N] [--drop-caches] [--keep] [--hold-ms N] */
#include "workload.h"

#include <sys/mman.h>
#include <sys/stat.h>

#define STRIDE WL_COLD_WINDOW

static const char *opt_file;
static long opt_count = 30;
static int opt_drop_caches, opt_keep;

static int other_opt(int argc, char **argv, int i)
{
	if (!strcmp(argv[i], "--file") && i + 1 < argc) {
		opt_file = argv[i + 1];
		return 2;
	}
	if (!strcmp(argv[i], "--count") && i + 1 < argc) {
		opt_count = wl_parse_long(argv[i + 1], "--count");
		return 2;
	}
	if (!strcmp(argv[i], "--drop-caches")) {
		opt_drop_caches = 1;
		return 1;
	}
	if (!strcmp(argv[i], "--keep")) {
		opt_keep = 1;
		return 1;
	}
	return 0;
}

static void drop_all_caches(void)
{
	int fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);

	sync();
	if (fd < 0 || write(fd, "1\n", 2) != 2)
		fprintf(stderr, "cold_filemap: warning: --drop-caches failed (%s); "
			"relying on posix_fadvise only\n", strerror(errno));
	if (fd >= 0)
		close(fd);
}

int main(int argc, char **argv)
{
	char extra[4352], *buf, *map; /* extra: the file name, up to PATH_MAX */
	unsigned char *vec;
	size_t size, npages, cached = 0, i;
	long psz = sysconf(_SC_PAGESIZE);
	int fd, e;

	if (wl_parse_args(argc, argv, other_opt))
		wl_usage_die("cold_filemap takes no mode");
	if (opt_count < 1 || opt_count > WL_MAX_CALLS)
		wl_usage_die("--count must be 1..512");
	if (!opt_file) {
		opt_file = wl_scratch_file("cold-filemap");
	}

	/* Heap copy of the file image: the strings are written here, then to the file. */
	size = (size_t)opt_count * STRIDE;
	buf = calloc(1, size);
	if (!buf)
		wl_die("calloc");
	for (i = 0; i < (size_t)opt_count; i++)
		snprintf(buf + i * STRIDE, STRIDE,
			 WL_NOWHERE "/cold-filemap-%d-%03zu", (int)getpid(), i);

	if (unlink(opt_file) && errno != ENOENT)
		wl_die("unlink old data file");
	fd = open(opt_file, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		wl_die("create data file");
	for (i = 0; i < size;) {
		ssize_t n = write(fd, buf + i, size - i);

		if (n <= 0)
			wl_die("write data file");
		i += n;
	}
	if (fsync(fd))
		wl_die("fsync");
	if (opt_drop_caches)
		drop_all_caches();
	e = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	if (e) {
		errno = e;
		wl_die("posix_fadvise(DONTNEED)");
	}

	map = wl_mmap_file_aligned(fd, size, WL_PMD_SIZE);
	if (madvise(map, size, MADV_RANDOM))
		wl_die("madvise(MADV_RANDOM)");

	/* mincore on a file mapping reports page-cache residency (not PTEs): a
	 * diagnostic for "did the cache drop work". It does not touch the pages. */
	npages = size / psz;
	vec = malloc(npages);
	if (!vec)
		wl_die("malloc");
	if (mincore(map, size, vec) == 0)
		for (i = 0; i < npages; i++)
			cached += vec[i] & 1;

	for (i = 0; i < (size_t)opt_count; i++) {
		const char *warm = buf + i * STRIDE;
		const char *cold = map + i * STRIDE;
		struct wl_call *c = wl_prepare("openat", "pathname", cold, warm,
					       strlen(warm) + 1, 1);
		long r = openat(AT_FDCWD, cold, O_RDONLY | O_CLOEXEC);

		wl_done(c, r, errno);
		if (r >= 0)
			close(r);
	}

	snprintf(extra, sizeof extra, "\"file\": \"%s\", \"stride\": %d, \"cached_pages_after_drop\": %zu",
		 opt_file, STRIDE, cached);
	wl_emit("cold_filemap", "openat", extra);
	wl_hold();
	if (!opt_keep)
		unlink(opt_file);
	return 0;
}
