/* wordfreq: a WASI task agent (command).
 *
 * stdin:  UTF-8 / ASCII text, at most the host's input limit.
 * stdout: one line per distinct word, "<count> <word>\n", sorted by count
 *         (descending) then word (ascending, bytewise).
 * exit:   0 on success, 2 when memory runs out (the host's memory limit:
 *         memory.grow returned -1 and malloc returned NULL).
 *
 * A word is a maximal run of ASCII letters and digits, lowercased; every other
 * byte separates words. Words longer than 64 bytes are cut to 64 bytes.
 * Reference implementation in Python: tests/test_fabric_sandbox.py::reference_wordfreq.
 */
#include <ctype.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WORD 64

typedef struct {
    char *word;      /* NUL-terminated, owned */
    uint32_t count;
    uint32_t hash;
} entry_t;

static entry_t *table;
static size_t table_cap, table_len;

static void out_of_memory(void) {
    fputs("wordfreq: out of memory\n", stderr);
    exit(2);
}

static uint32_t fnv1a(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)s[i]; h *= 16777619u; }
    return h;
}

static void grow(void) {
    size_t new_cap = table_cap ? table_cap * 2 : 1024;
    entry_t *fresh = calloc(new_cap, sizeof(entry_t));
    if (!fresh) out_of_memory();
    for (size_t i = 0; i < table_cap; i++) {
        if (!table[i].word) continue;
        size_t j = table[i].hash & (new_cap - 1);
        while (fresh[j].word) j = (j + 1) & (new_cap - 1);
        fresh[j] = table[i];
    }
    free(table);
    table = fresh;
    table_cap = new_cap;
}

static void add_word(const char *w, size_t n) {
    if (table_len * 2 >= table_cap) grow();
    uint32_t h = fnv1a(w, n);
    size_t j = h & (table_cap - 1);
    while (table[j].word) {
        if (table[j].hash == h && strlen(table[j].word) == n && memcmp(table[j].word, w, n) == 0) {
            table[j].count++;
            return;
        }
        j = (j + 1) & (table_cap - 1);
    }
    char *copy = malloc(n + 1);
    if (!copy) out_of_memory();
    memcpy(copy, w, n);
    copy[n] = '\0';
    table[j].word = copy;
    table[j].count = 1;
    table[j].hash = h;
    table_len++;
}

static int by_count_then_word(const void *a, const void *b) {
    const entry_t *x = a, *y = b;
    if (x->count != y->count) return x->count > y->count ? -1 : 1;
    return strcmp(x->word, y->word);
}

int main(void) {
    char word[MAX_WORD];
    size_t len = 0;
    int c;
    while ((c = getchar()) != EOF) {
        if (c < 128 && isalnum(c)) {
            if (len < MAX_WORD) word[len++] = (char)tolower(c);
        } else if (len) {
            add_word(word, len);
            len = 0;
        }
    }
    if (len) add_word(word, len);

    entry_t *list = malloc((table_len ? table_len : 1) * sizeof(entry_t));
    if (!list) out_of_memory();
    size_t n = 0;
    for (size_t i = 0; i < table_cap; i++) if (table[i].word) list[n++] = table[i];
    qsort(list, n, sizeof(entry_t), by_count_then_word);
    for (size_t i = 0; i < n; i++) printf("%u %s\n", list[i].count, list[i].word);
    return ferror(stdout) ? 1 : 0;
}
