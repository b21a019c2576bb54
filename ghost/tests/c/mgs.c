/* Modified Gram-Schmidt QR of an n x n matrix (the ghost process paper's workload), then
 * waits to be checkpointed. Prints "ready" once the factorisation is done. */
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    int log = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    double *a = malloc(sizeof(double) * n * n), *r = calloc((size_t)n * n, sizeof(double));
    srand(1);
    for (long i = 0; i < (long)n * n; i++) a[i] = rand() / (double)RAND_MAX;
    /* column-major: column k is a[k*n .. k*n+n) */
    for (int k = 0; k < n; k++) {
        double *qk = a + (long)k * n, s = 0;
        for (int i = 0; i < n; i++) s += qk[i] * qk[i];
        r[(long)k * n + k] = sqrt(s);
        for (int i = 0; i < n; i++) qk[i] /= r[(long)k * n + k];
        for (int j = k + 1; j < n; j++) {
            double *aj = a + (long)j * n, d = 0;
            for (int i = 0; i < n; i++) d += qk[i] * aj[i];
            r[(long)j * n + k] = d;
            for (int i = 0; i < n; i++) aj[i] -= d * qk[i];
        }
    }
    dprintf(log, "ready %f\n", r[0]);
    for (;;) pause();
}
