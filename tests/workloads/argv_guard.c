/* argv_guard: a failed execve whose argv pointer array runs into a PROT_NONE page.
 *
 * The array's first N pointers (--pointers N, default 2) fill the last bytes of a readable
 * page; the next page is PROT_NONE, so the array has no NULL the kernel can reach and execve
 * fails with EFAULT. A BPF read of argv fails on the third pointer (argv lost), which is what
 * sends the record to the agent's user-space fallback. Then one ordinary failed execve
 * (ENOENT, argv on the stack) follows, so a test can see that the agent still captures.
 *
 * --cut-string: instead, the array is ordinary (NULL-terminated) and its last string fills
 * the end of the readable page without a NUL: the string runs into the guard page.
 *
 * After its output it holds until stdin closes (a test's cue), so the fallback can read it.
 *
 * Output (one JSON line): {"workload": "argv_guard", "pid", "pointers", "array_addr",
 *   "guard_addr", "ret", "errno", "args": [...], "after": {"filename", "ret", "errno",
 *   "argv": [...]}}
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "workload.h"

static const char *const ARGS[] = {"/bin/true", "--tf-guard-arg-1", "tf-guard-arg-2",
				   "tf-guard-arg-3"};

int main(int argc, char **argv)
{
	long n = 2;
	int cut = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--cut-string")) {
			cut = 1;
		} else if (!strcmp(argv[i], "--pointers") && i + 1 < argc) {
			char *end;
			n = strtol(argv[++i], &end, 10);
			if (*end || n < 0 || n > 4) {
				fprintf(stderr, "usage error: --pointers takes 0..4\n");
				return 2;
			}
		} else {
			fprintf(stderr, "usage: argv_guard [--pointers N] [--cut-string]\n");
			return 2;
		}
	}
	long page = sysconf(_SC_PAGESIZE);
	char *map = mmap(NULL, 2 * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (map == MAP_FAILED) {
		fprintf(stderr, "workload setup failed: mmap: %s\n", strerror(errno));
		return 1;
	}
	char *guard = map + page;
	const char **arr = (const char **)(guard - n * sizeof(char *));
	const char *cut_arr[3];
	static const char CUT[] = "tf-cut-at-guard";
	if (cut) {
		/* the string's last byte is the page's last: no NUL before the guard */
		char *s = guard - (sizeof(CUT) - 1);
		memcpy(s, CUT, sizeof(CUT) - 1);
		cut_arr[0] = ARGS[0];
		cut_arr[1] = s;
		cut_arr[2] = NULL;
		arr = cut_arr;
		n = 1; /* the strings a reader can get whole */
	} else {
		for (long i = 0; i < n; i++)
			arr[i] = ARGS[i];
	}
	if (mprotect(guard, page, PROT_NONE)) {
		fprintf(stderr, "workload setup failed: mprotect: %s\n", strerror(errno));
		return 1;
	}
	char *envp[] = {NULL};
	long ret = execve("/bin/true", (char *const *)arr, envp);
	int err = errno;

	char after_file[] = WL_NOWHERE "/argv-guard-after";
	char a0[] = "argv-guard-after", a1[] = "--still-captured";
	char *after_argv[] = {a0, a1, NULL};
	long ret2 = execve(after_file, after_argv, envp);
	int err2 = errno;

	printf("{\"workload\": \"argv_guard\", \"pid\": %d, \"cut_string\": %s, \"pointers\": %ld, "
	       "\"array_addr\": \"%p\", \"guard_addr\": \"%p\", \"ret\": %ld, \"errno\": %d, "
	       "\"args\": [",
	       getpid(), cut ? "true" : "false", n, (void *)arr, (void *)guard, ret, err);
	for (long i = 0; i < n; i++)
		printf("%s\"%s\"", i ? ", " : "", ARGS[i]);
	printf("], \"after\": {\"filename\": \"%s\", \"ret\": %ld, \"errno\": %d, "
	       "\"argv\": [\"%s\", \"%s\"]}}\n",
	       after_file, ret2, err2, a0, a1);
	fflush(stdout);
	char buf[64];
	while (read(0, buf, sizeof(buf)) > 0)
		;
	return 0;
}
