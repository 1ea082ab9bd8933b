/* hostile: reads the wall clock. Prints "clock <seconds>" or "clock denied errno=<n>". */
#include <errno.h>
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        printf("clock denied errno=%d\n", errno);
        return 1;
    }
    printf("clock %lld\n", (long long)ts.tv_sec);
    return 0;
}
