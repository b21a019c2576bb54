/* Benchmark target: touches N MiB of patterned memory, says "ready", then idles. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t n = strtoul(argv[1], 0, 10) << 20;
    unsigned long long *p = malloc(n);
    for (size_t i = 0; i < n / 8; i++) p[i] = i * 0x9E3779B97F4A7C15ULL;
    int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dprintf(fd, "ready\n");
    for (;;) pause();
}
