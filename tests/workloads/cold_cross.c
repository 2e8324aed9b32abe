/* cold_cross: a path that starts near the end of a resident page and continues into a
 * non-resident one, in a private file mapping.
 *
 * The data file is 128 KiB; the string starts --split bytes (default 16) before the
 * 64 KiB boundary, so its head is in page 15 (touched from user space: resident) and
 * its tail in page 16 (page cache dropped, MADV_RANDOM, and in the next fault-around
 * window, so touching page 15 cannot map it). A non-sleepable read of the whole
 * string fails on the second page even though the first is present.
 *
 * Usage: cold_cross [--file PATH] [--split N] [--keep] [--hold-ms N] */
#include "workload.h"

#include <sys/mman.h>

#define BOUNDARY WL_COLD_WINDOW
#define FILE_SIZE (2 * WL_COLD_WINDOW)

static const char *opt_file;
static long opt_split = 16;
static int opt_keep;

static int other_opt(int argc, char **argv, int i)
{
	if (!strcmp(argv[i], "--file") && i + 1 < argc) {
		opt_file = argv[i + 1];
		return 2;
	}
	if (!strcmp(argv[i], "--split") && i + 1 < argc) {
		opt_split = wl_parse_long(argv[i + 1], "--split");
		return 2;
	}
	if (!strcmp(argv[i], "--keep")) {
		opt_keep = 1;
		return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	char path[160], extra[4352], *buf, *map; /* extra: the file name, up to PATH_MAX */
	long psz = sysconf(_SC_PAGESIZE);
	size_t off, plen, i;
	struct wl_call *c;
	int fd, e;
	long r;

	if (wl_parse_args(argc, argv, other_opt))
		wl_usage_die("cold_cross takes no mode");
	if (!opt_file) {
		opt_file = wl_scratch_file("cold-cross");
	}
	snprintf(path, sizeof path,
		 WL_NOWHERE "/cold-cross-%d-this-path-spans-a-page-boundary",
		 (int)getpid());
	plen = strlen(path) + 1;
	if (opt_split < 1 || (size_t)opt_split >= plen || opt_split >= psz)
		wl_usage_die("--split must be 1..strlen(path) and < page size");
	off = BOUNDARY - opt_split;

	buf = calloc(1, FILE_SIZE);
	if (!buf)
		wl_die("calloc");
	memcpy(buf + off, path, plen);

	if (unlink(opt_file) && errno != ENOENT)
		wl_die("unlink old data file");
	fd = open(opt_file, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		wl_die("create data file");
	for (i = 0; i < FILE_SIZE;) {
		ssize_t n = write(fd, buf + i, FILE_SIZE - i);

		if (n <= 0)
			wl_die("write data file");
		i += n;
	}
	if (fsync(fd))
		wl_die("fsync");
	e = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	if (e) {
		errno = e;
		wl_die("posix_fadvise(DONTNEED)");
	}

	map = wl_mmap_file_aligned(fd, FILE_SIZE, WL_PMD_SIZE);
	if (madvise(map, FILE_SIZE, MADV_RANDOM))
		wl_die("madvise(MADV_RANDOM)");

	/* Fault in the first page only: read its first byte (not part of the string). */
	(void)*(volatile char *)(map + (off & ~(size_t)(psz - 1)));

	c = wl_prepare("openat", "pathname", map + off, path, plen, 1);
	r = openat(AT_FDCWD, map + off, O_RDONLY | O_CLOEXEC);
	wl_done(c, r, errno);
	if (r >= 0)
		close(r);

	snprintf(extra, sizeof extra, "\"file\": \"%s\", \"split\": %ld", opt_file, opt_split);
	wl_emit("cold_cross", "openat", extra);
	wl_hold();
	if (!opt_keep)
		unlink(opt_file);
	return 0;
}
