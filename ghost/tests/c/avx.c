/* Keeps values in ymm8/ymm9 (AVX, upper halves included) for its whole life and checks them
 * in a loop written in assembly, so no library call can touch them. Prints "ok" or "BAD". */
#include <fcntl.h>
static const unsigned long long pat[4] __attribute__((aligned(32))) = {
    0x0123456789abcdefULL, 0xfedcba9876543210ULL, 0x1111222233334444ULL, 0x5555666677778888ULL};
static const char ok[] = "ok\n", bad[] = "BAD\n";
int main(int argc, char **argv) {
    int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    __asm__ volatile(
        "mov %[p], %%r12\n mov %[ok], %%r13\n mov %[bad], %%r14\n mov %[fd], %%r15d\n"
        "vmovdqa (%%r12), %%ymm8\n"
        "vpaddq %%ymm8, %%ymm8, %%ymm9\n"
        "1: mov $20000000, %%rcx\n"
        "2: dec %%rcx\n jnz 2b\n"
        "vmovdqa (%%r12), %%ymm0\n"
        "vpcmpeqq %%ymm0, %%ymm8, %%ymm1\n"
        "vpaddq %%ymm0, %%ymm0, %%ymm2\n"
        "vpcmpeqq %%ymm2, %%ymm9, %%ymm3\n"
        "vpand %%ymm1, %%ymm3, %%ymm1\n"
        "vpmovmskb %%ymm1, %%eax\n"
        "cmp $-1, %%eax\n jne 3f\n"
        "mov $1, %%eax\n mov %%r15d, %%edi\n mov %%r13, %%rsi\n mov $3, %%edx\n syscall\n"
        "jmp 1b\n"
        "3: mov $1, %%eax\n mov %%r15d, %%edi\n mov %%r14, %%rsi\n mov $4, %%edx\n syscall\n"
        "mov $231, %%eax\n mov $3, %%edi\n syscall\n"
        :
        : [p] "r"(pat), [ok] "r"(ok), [bad] "r"(bad), [fd] "r"(fd)
        : "rax", "rcx", "rdx", "rsi", "rdi", "r11", "r12", "r13", "r14", "r15", "memory",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm8", "xmm9");
    return 0;
}
