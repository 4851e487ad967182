/* Preloaded (LD_PRELOAD), makes reads of one file fail with EIO, as a failing disk does: every
 * read(2) and pread(2) of a file whose path contains $EIO_NAME, at an offset from $EIO_AFTER on
 * (and before $EIO_UNTIL where set). Built and used by tests/test_read_failures.py. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static int fails(int fd, off_t offset) {
    const char *name = getenv("EIO_NAME"), *after = getenv("EIO_AFTER");
    const char *until = getenv("EIO_UNTIL");
    if (!name || !after || offset < atoll(after) || (until && offset >= atoll(until)))
        return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t length = readlink(link, path, sizeof path - 1);
    if (length < 0)
        return 0;
    path[length] = '\0';
    return strstr(path, name) != NULL;
}

ssize_t pread(int fd, void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, void *, size_t, off_t);
    if (!real)
        real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread");
    if (fails(fd, offset)) {
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count, offset);
}

ssize_t pread64(int fd, void *buf, size_t count, off_t offset) {
    return pread(fd, buf, count, offset);
}

ssize_t read(int fd, void *buf, size_t count) {
    static ssize_t (*real)(int, void *, size_t);
    if (!real)
        real = (ssize_t (*)(int, void *, size_t))dlsym(RTLD_NEXT, "read");
    if (fails(fd, lseek(fd, 0, SEEK_CUR))) {  /* -1 (not seekable) is before any offset */
        errno = EIO;
        return -1;
    }
    return real(fd, buf, count);
}
