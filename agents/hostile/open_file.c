/* hostile: reads a path from stdin and tries to open and print that file.
 * Exit 0 and the file's bytes on stdout if it could; exit 1 and
 * "denied errno=<n>" otherwise. Without a preopened directory WASI grants
 * no filesystem at all, so the open must fail. */
#include <errno.h>
#include <stdio.h>
#include <string.h>

int main(void) {
    char path[512];
    size_t n = fread(path, 1, sizeof path - 1, stdin);
    path[n] = '\0';
    char *nl = strchr(path, '\n');
    if (nl) *nl = '\0';
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("denied errno=%d\n", errno);
        return 1;
    }
    char buf[4096];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, got, stdout);
    fclose(f);
    return 0;
}
