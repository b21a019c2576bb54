/* Blocks in read(2) on stdin (a pipe from the test) and logs every line it gets. */
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int log = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    char buf[256];
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n <= 0) { dprintf(log, "EOF %zd\n", n); return 0; }
        dprintf(log, "got %.*s", (int)n, buf);
    }
}
