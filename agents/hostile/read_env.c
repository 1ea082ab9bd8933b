/* hostile: prints every environment variable it can see, then
 * "env count <n>". The host passes no environment unless granted. */
#include <stdio.h>

extern char **environ;

int main(void) {
    int n = 0;
    for (char **e = environ; e && *e; e++, n++) printf("%s\n", *e);
    printf("env count %d\n", n);
    return 0;
}
