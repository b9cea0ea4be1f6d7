/*
 * printf.c - a small vsnprintf.
 *
 * Conversions: %s %c %d %i %u %x %X %p %%; length modifiers l, ll, z;
 * flags '-' (left-justify), '0' (zero-pad), '#' (0x prefix for %x);
 * a field width (digits or *); a precision for %s (".N" or ".*": at most
 * N bytes, which need not be NUL-terminated).
 * No floating point (guests are built without x87/SSE).
 */
#include "xk.h"

struct out {
    char *buf;
    size_t size;
    size_t len;     /* characters produced so far (may exceed size) */
};

static void put(struct out *o, char c)
{
    if (o->len + 1 < o->size)
        o->buf[o->len] = c;
    o->len++;
}

static void put_padded(struct out *o, const char *s, size_t n, int width, bool left, char pad)
{
    size_t w = width > 0 ? (size_t)width : 0;
    if (!left)
        for (size_t i = n; i < w; i++)
            put(o, pad);
    for (size_t i = 0; i < n; i++)
        put(o, s[i]);
    if (left)
        for (size_t i = n; i < w; i++)
            put(o, ' ');
}

static void put_number(struct out *o, uint64_t v, bool neg, unsigned base, bool upper,
                       int width, bool left, bool zero, const char *prefix)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = digits[v % base];
        v /= base;
    } while (v);

    size_t plen = prefix ? strlen(prefix) : 0;
    int total = n + (neg ? 1 : 0) + (int)plen;
    if (zero && !left) {
        /* sign and prefix go before the zeros */
        if (neg)
            put(o, '-');
        for (size_t i = 0; i < plen; i++)
            put(o, prefix[i]);
        for (int i = total; i < width; i++)
            put(o, '0');
    } else {
        if (!left)
            for (int i = total; i < width; i++)
                put(o, ' ');
        if (neg)
            put(o, '-');
        for (size_t i = 0; i < plen; i++)
            put(o, prefix[i]);
    }
    while (n)
        put(o, tmp[--n]);
    if (left)
        for (int i = total; i < width; i++)
            put(o, ' ');
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    struct out o = { buf, size, 0 };

    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put(&o, *fmt);
            continue;
        }
        fmt++;
        bool left = false, zero = false, alt = false;
        for (;; fmt++) {
            if (*fmt == '-')
                left = true;
            else if (*fmt == '0')
                zero = true;
            else if (*fmt == '#')
                alt = true;
            else
                break;
        }
        int width = 0;
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                left = true;
                width = -width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        int prec = -1;
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        int lng = 0;    /* 0 int, 1 long, 2 long long; z counts as long */
        while (*fmt == 'l' || *fmt == 'z') {
            lng++;
            fmt++;
        }

        switch (*fmt) {
        case '%':
            put(&o, '%');
            break;
        case 'c': {
            char c = (char)va_arg(ap, int);
            put_padded(&o, &c, 1, width, left, ' ');
            break;
        }
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            put_padded(&o, s, prec >= 0 ? strnlen(s, (size_t)prec) : strlen(s), width, left, ' ');
            break;
        }
        case 'd':
        case 'i': {
            int64_t v = lng ? va_arg(ap, int64_t) : va_arg(ap, int);
            bool neg = v < 0;
            uint64_t mag = neg ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
            put_number(&o, mag, neg, 10, false, width, left, zero, NULL);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            uint64_t v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
            const char *prefix = (alt && *fmt != 'u' && v) ? (*fmt == 'X' ? "0X" : "0x") : NULL;
            put_number(&o, v, false, *fmt == 'u' ? 10 : 16, *fmt == 'X', width, left, zero, prefix);
            break;
        }
        case 'p': {
            uint64_t v = (uint64_t)(uintptr_t)va_arg(ap, void *);
            put_number(&o, v, false, 16, false, width, left, zero, "0x");
            break;
        }
        case '\0':
            fmt--;      /* lone '%' at the end */
            break;
        default:        /* unknown conversion: print it verbatim */
            put(&o, '%');
            put(&o, *fmt);
            break;
        }
    }
    if (size)
        buf[o.len < size ? o.len : size - 1] = '\0';
    return (int)o.len;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}

int vprintf(const char *fmt, va_list ap)
{
    char buf[512];
    int n = vsnprintf(buf, sizeof(buf), fmt, ap);
    size_t len = (size_t)n < sizeof(buf) ? (size_t)n : sizeof(buf) - 1;
    console_write(buf, len);
    return n;
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

void hexdump(const void *p, size_t len, uint64_t base_addr)
{
    const uint8_t *b = p;
    for (size_t off = 0; off < len; off += 16) {
        char line[96];
        size_t n = 0;
        n += (size_t)snprintf(line + n, sizeof(line) - n, "%08lx: ", base_addr + off);
        for (size_t i = 0; i < 16; i++) {
            if (off + i < len)
                n += (size_t)snprintf(line + n, sizeof(line) - n, "%02x ", b[off + i]);
            else
                n += (size_t)snprintf(line + n, sizeof(line) - n, "   ");
        }
        line[n++] = ' ';
        for (size_t i = 0; i < 16 && off + i < len; i++) {
            uint8_t c = b[off + i];
            line[n++] = (c >= 0x20 && c < 0x7f) ? (char)c : '.';
        }
        line[n++] = '\n';
        console_write(line, n);
    }
}
