/*
 * harness.c - test result lines and the summary.
 *
 *   PASS <name>
 *   FAIL <name>: <reason>
 *   SKIP <name>: <reason>          (informational, not counted)
 *   SUMMARY: <N> passed, <M> failed
 *
 * Safe to call from any CPU (counters are atomic, lines are written whole).
 */
#include "xk.h"

static volatile uint32_t n_passed, n_failed;

unsigned harness_passed(void) { return n_passed; }
unsigned harness_failed(void) { return n_failed; }

static void result_line(const char *tag, const char *name, const char *fmt, va_list *ap)
{
    char line[512];
    int n = snprintf(line, sizeof(line), "%s %s", tag, name);
    if (fmt) {
        if ((size_t)n < sizeof(line))
            n += snprintf(line + n, sizeof(line) - (size_t)n, ": ");
        if ((size_t)n < sizeof(line)) {
            if (ap)
                n += vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, *ap);
            else
                n += snprintf(line + n, sizeof(line) - (size_t)n, "%s", fmt);
        }
    }
    /* one result per line: keep room for the newline, drop embedded ones */
    size_t len = (size_t)n < sizeof(line) - 1 ? (size_t)n : sizeof(line) - 2;
    for (size_t i = 0; i < len; i++)
        if (line[i] == '\n' || line[i] == '\r')
            line[i] = ' ';
    line[len++] = '\n';
    console_write(line, len);
}

void pass(const char *name)
{
    xk_fetch_add(&n_passed, 1);
    result_line("PASS", name, NULL, NULL);
}

static void vfail(const char *name, const char *fmt, va_list *ap)
{
    xk_fetch_add(&n_failed, 1);
    if (fmt) {
        result_line("FAIL", name, fmt, ap);
    } else {
        result_line("FAIL", name, "failed", NULL);
    }
}

void fail(const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfail(name, fmt, &ap);
    va_end(ap);
}

bool check(bool cond, const char *name, const char *fmt, ...)
{
    if (cond) {
        pass(name);
        return true;
    }
    va_list ap;
    va_start(ap, fmt);
    vfail(name, fmt, &ap);
    va_end(ap);
    return false;
}

void skip(const char *name, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    result_line("SKIP", name, fmt, &ap);
    va_end(ap);
}

void xk_finish(void)
{
    if (!console_claim_final())
        xk_halt_forever();              /* another CPU is reporting */
    printf("SUMMARY: %u passed, %u failed\n", (unsigned)n_passed, (unsigned)n_failed);
    xk_poweroff();
}
