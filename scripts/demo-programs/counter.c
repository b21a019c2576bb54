/* The demo's application: counts forever, one line per 100 ms, into the file named by
 * argv[1], keeping its state in memory (a 64 MiB buffer it checks on every step) so a
 * restart that lost memory would show. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: counter LOGFILE\n");
        return 2;
    }
    size_t n = 64u << 20;
    unsigned char *heap = malloc(n);
    if (!heap) return 1;
    for (size_t i = 0; i < n; i++) heap[i] = (unsigned char)(i * 31);
    FILE *log = fopen(argv[1], "a");
    if (!log) return 1;
    for (unsigned long count = 0;; count++) {
        size_t probe = (count * 4099) % n;
        if (heap[probe] != (unsigned char)(probe * 31)) {
            fprintf(log, "memory damaged at %zu\n", probe);
            fflush(log);
            return 3;
        }
        fprintf(log, "count %lu\n", count);
        fflush(log);
        usleep(100000);
    }
}
