/* Test program for ghost export/import: a counter loop writing to a log (plain offset) and an
 * appended file, a big patterned heap, mappings of every protection, shared anonymous memory,
 * and a SIGUSR1 handler that makes it verify all its memory. */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1++; }

static unsigned char *maps[5];
static const int fill[5] = {0x11, 0x22, 0x33, 0xc3, 0x44};

static int check(unsigned long long *heap, size_t words) {
    for (size_t i = 0; i < words; i++)
        if (heap[i] != i * 0x9E3779B97F4A7C15ULL + 7) return 0;
    for (int m = 0; m < 5; m++) {
        if (m == 0) mprotect(maps[0], 4096, PROT_READ); /* PROT_NONE page: look, then hide */
        for (int i = 0; i < 4096; i++)
            if (maps[m][i] != fill[m]) return 0;
        if (m == 0) mprotect(maps[0], 4096, PROT_NONE);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    size_t mb = strtoul(argv[1], 0, 10);
    int log = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int app = open(argv[3], O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log < 0 || app < 0) return 2;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    size_t words = (mb << 20) / 8;
    unsigned long long *heap = malloc(words * 8 + 8);
    for (size_t i = 0; i < words; i++) heap[i] = i * 0x9E3779B97F4A7C15ULL + 7;
    static const int prot[5] = {PROT_NONE, PROT_READ, PROT_READ | PROT_WRITE,
                                PROT_READ | PROT_EXEC, PROT_READ | PROT_WRITE};
    for (int m = 0; m < 5; m++) {
        int flags = (m == 4 ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS;
        maps[m] = mmap(0, 4096, PROT_READ | PROT_WRITE, flags, -1, 0);
        memset(maps[m], fill[m], 4096);
        mprotect(maps[m], 4096, prot[m]);
    }
    int seen = 0;
    for (unsigned long counter = 1;; counter++) {
        dprintf(log, "%lu\n", counter);
        dprintf(app, "a%lu\n", counter);
        if (usr1 != seen) {
            seen = usr1;
            dprintf(log, "CHECK %s %d\n", check(heap, words) ? "OK" : "BAD", seen);
        }
        usleep(5000);
    }
}
