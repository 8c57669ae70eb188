/* pit_modes: the 8254's counting modes, read through counter 2 and port
 * 0x61, with interrupts off the whole time.
 *
 * Port 0x61 bit 0 is counter 2's GATE, bit 5 its OUT (OUT2). Counter 0 is
 * reprogrammed as a free-running reference (mode 2, count 65536): "wait n
 * clocks" polls its latched count, so every wait is in the PIT's own time,
 * never in processor speed. Nothing asserts how long anything took.
 *
 * Checks (Intel 8254 datasheet: "Control Word Format", "Read Operations",
 * "Read-Back Command", "Status Byte", "Mode Definitions"):
 *  - read-back status byte: OUTPUT, NULL COUNT, RW, mode and BCD fields
 *    right after a control word, NULL COUNT clear once the count is loaded,
 *    status and count latched together by one read-back command;
 *  - LSB-only, MSB-only and LSB-then-MSB access, read with the latch;
 *  - a second counter latch command before the first count is read is
 *    ignored;
 *  - mode 0: OUT low after the control word, high at terminal count; the
 *    read-back status and count always agree; the count wraps after
 *    terminal count and OUT stays high;
 *  - GATE low stops counting in mode 0 (two latched reads, with PIT time in
 *    between, are equal) and GATE high resumes it;
 *  - mode 2: the count runs N..1 and reloads, never showing 0;
 *  - mode 3: OUT2 toggles (both halves of the square wave seen in port
 *    0x61), the count of an even N decrements by two;
 *  - BCD counting: every latched count is a valid BCD number and they
 *    decrease in decimal.
 */
#include "runtime.h"
#include "hw.h"

/* Read-back command (SC = 11): bit 5 = !COUNT, bit 4 = !STATUS, bits 3:1
 * select counters 2, 1, 0. */
#define RB_STATUS_CH2 0xE8 /* latch status only */
#define RB_COUNT_CH2 0xD8  /* latch count only */
#define RB_BOTH_CH2 0xC8   /* latch status and count */

#define ST_OUTPUT 0x80
#define ST_NULL 0x40

static void gate2(int on) { outb(PORT61, on ? P61_GATE2 : 0); }
static int out2(void) { return (inb(PORT61) & P61_OUT2) != 0; }

static uint8_t status2(void)
{
    outb(PIT_CW, RB_STATUS_CH2);
    return inb(PIT_CH2);
}

static int is_bcd(uint16_t v)
{
    for (int i = 0; i < 16; i += 4)
        if (((v >> i) & 0xF) > 9)
            return 0;
    return 1;
}

static void check_status_fields(void)
{
    int ok = 1;
    gate2(0);
    /* Mode 3, LSB then MSB, binary: OUT high, no count yet. */
    outb(PIT_CW, PIT_CWORD(2, PIT_RW_BOTH, 3, 0));
    ok &= expect("mode 3, RW 3, no count", status2(), ST_OUTPUT | ST_NULL | 0x30 | (3 << 1));
    /* Mode 0, LSB only, binary: OUT low after the control word. */
    outb(PIT_CW, PIT_CWORD(2, PIT_RW_LSB, 0, 0));
    ok &= expect("mode 0, RW 1", status2(), ST_NULL | 0x10);
    /* Mode 1, MSB only, BCD: OUT high. */
    outb(PIT_CW, PIT_CWORD(2, PIT_RW_MSB, 1, 1));
    ok &= expect("mode 1, RW 2, BCD", status2(), ST_OUTPUT | ST_NULL | 0x20 | (1 << 1) | 1);
    /* Mode 2, LSB then MSB: once the count is written and loaded (on the
     * next clock; we wait 10), NULL COUNT clears. GATE is low, so mode 2
     * keeps OUT high and does not count. */
    outb(PIT_CW, PIT_CWORD(2, PIT_RW_BOTH, 2, 0));
    ok &= expect("mode 2 before the count", status2(), ST_OUTPUT | ST_NULL | 0x30 | (2 << 1));
    outb(PIT_CH2, 0x00);
    outb(PIT_CH2, 0x10);
    pit_ref_wait(10, 0);
    ok &= expect("mode 2 after the count", status2(), ST_OUTPUT | 0x30 | (2 << 1));
    report("read-back status byte: OUTPUT, NULL COUNT, RW, mode and BCD after the control word and the count", ok);
}

static void check_access_modes(void)
{
    int ok = 1;
    gate2(0); /* mode 0 with GATE low: the count is loaded but not counted */

    outb(PIT_CW, PIT_CWORD(2, PIT_RW_LSB, 0, 0));
    outb(PIT_CH2, 0x34);
    pit_ref_wait(10, 0);
    outb(PIT_CW, 2 << 6); /* counter latch */
    ok &= expect("LSB only: latched byte", inb(PIT_CH2), 0x34);
    ok &= expect("LSB only: unlatched byte", inb(PIT_CH2), 0x34);

    outb(PIT_CW, PIT_CWORD(2, PIT_RW_MSB, 0, 0));
    outb(PIT_CH2, 0x12);
    pit_ref_wait(10, 0);
    outb(PIT_CW, 2 << 6);
    ok &= expect("MSB only: latched byte (count 0x1200)", inb(PIT_CH2), 0x12);

    outb(PIT_CW, PIT_CWORD(2, PIT_RW_BOTH, 0, 0));
    outb(PIT_CH2, 0x78);
    outb(PIT_CH2, 0x56);
    pit_ref_wait(10, 0);
    outb(PIT_CW, 2 << 6);
    uint8_t lo = inb(PIT_CH2), hi = inb(PIT_CH2);
    ok &= expect("LSB then MSB: latched count", (uint64_t)(lo | hi << 8), 0x5678);

    /* Read-back of status and count together: status first, then the count. */
    outb(PIT_CW, RB_BOTH_CH2);
    uint8_t st = inb(PIT_CH2);
    lo = inb(PIT_CH2);
    hi = inb(PIT_CH2);
    ok &= expect("read-back status (mode 0, loaded, OUT low)", st, 0x30);
    ok &= expect("read-back count", (uint64_t)(lo | hi << 8), 0x5678);
    report("LSB-only, MSB-only and LSB/MSB access; read-back latches status and count together", ok);

    /* A second latch command before the count is read is ignored. */
    outb(PIT_CW, 2 << 6);          /* latches 0x5678 (GATE low: frozen) */
    gate2(1);                      /* now it counts */
    pit_ref_wait(300, 0);
    outb(PIT_CW, 2 << 6);          /* ignored: the first latch is unread */
    lo = inb(PIT_CH2);
    hi = inb(PIT_CH2);
    uint16_t first = (uint16_t)(lo | hi << 8);
    uint16_t now = pit_latch_read(2);
    ok = expect("count from the first latch", first, 0x5678);
    ok &= expect_true("the counter ran meanwhile (a fresh latch differs)", now != 0x5678);
    report("a counter latch command while a latched count is unread is ignored", ok);
    gate2(0);
}

#define MODE0_N 2000

static void check_mode0(void)
{
    /* Written with GATE low: the count is loaded but not counted, so the
     * first sample is certain to come before terminal count. */
    gate2(0);
    outb(PIT_CW, PIT_CWORD(2, PIT_RW_BOTH, 0, 0));
    int out_after_cw = out2();
    outb(PIT_CH2, MODE0_N & 0xFF);
    outb(PIT_CH2, MODE0_N >> 8);
    pit_ref_wait(10, 0);
    outb(PIT_CW, RB_BOTH_CH2);
    uint8_t st0 = inb(PIT_CH2);
    uint16_t c0 = (uint16_t)(inb(PIT_CH2) | inb(PIT_CH2) << 8);
    int ok = expect("OUT2 after the control word", out_after_cw, 0);
    ok &= expect("status with the count loaded, GATE low", st0, 0x30);
    ok &= expect("count with GATE low", c0, MODE0_N);
    gate2(1);

    /* Sample status and count together until OUT has been high for a while. */
    int samples = 0, highs = 0, bad = 0, nonmono = 0, low_after_high = 0;
    uint16_t prev = 0xFFFF;
    int prev_out = 0;
    uint64_t t0 = pit_ref_clocks();
    while (highs < 20 && pit_ref_clocks() - t0 < 20 * MODE0_N) {
        outb(PIT_CW, RB_BOTH_CH2);
        uint8_t st = inb(PIT_CH2);
        uint16_t c = (uint16_t)(inb(PIT_CH2) | inb(PIT_CH2) << 8);
        int out = (st & ST_OUTPUT) != 0;
        samples++;
        if (!out) {
            /* Before terminal count the count is N..1. */
            if (c < 1 || c > MODE0_N)
                bad++;
            if (prev_out)
                low_after_high++;
            else if (c > prev)
                nonmono++;
        } else {
            highs++;
            /* At terminal count the count is 0, then it wraps to 0xFFFF. */
            if (c != 0 && c <= MODE0_N)
                bad++;
        }
        prev = c;
        prev_out = out;
    }
    int out2_end = out2();
    ok &= expect("samples with OUT high", highs, 20);
    ok &= expect("samples where OUT and the count disagree", bad, 0);
    ok &= expect("count increasing while OUT low", nonmono, 0);
    ok &= expect("OUT low again after terminal count", low_after_high, 0);
    ok &= expect("port 0x61 OUT2 after terminal count", out2_end, 1);
    if (!ok)
        printf("  (%d samples)\n", samples);
    report("mode 0: OUT2 low after the count is written, high at terminal count and stays high; status and count agree", ok);
}

static void check_gate(void)
{
    gate2(1);
    pit_program(2, 0, 50000);
    pit_ref_wait(100, 0);
    gate2(0);
    uint16_t c1 = pit_latch_read(2);
    pit_ref_wait(2000, 0);
    uint16_t c2 = pit_latch_read(2);
    gate2(1);
    pit_ref_wait(200, 0);
    uint16_t c3 = pit_latch_read(2);
    int ok = expect_true("the counter ran before GATE went low", c1 != 50000);
    ok &= expect("count after 2000 clocks with GATE low", c2, c1);
    ok &= expect_true("counting resumes with GATE high", c3 != c2);
    report("mode 0: GATE low stops counting (latched count unchanged over 2000 PIT clocks), GATE high resumes", ok);
    gate2(0);
}

/* Long enough (8.4 ms a period) that a loaded host, sampling through
 * port-I/O exits, still sees every reload. */
#define MODE2_N 10000

static void check_mode2(void)
{
    gate2(1);
    pit_program(2, 2, MODE2_N);
    int bad = 0, reloads = 0;
    uint16_t prev = pit_latch_read(2);
    uint64_t t0 = pit_ref_clocks();
    while (reloads < 3 && pit_ref_clocks() - t0 < 10 * MODE2_N) {
        uint16_t c = pit_latch_read(2);
        if (c < 1 || c > MODE2_N)
            bad++;
        if (c > prev)
            reloads++;
        prev = c;
    }
    int ok = expect("counts outside 1..N", bad, 0);
    ok &= expect("reloads seen", reloads, 3);
    report("mode 2: the count runs N..1 and reloads with N (never 0)", ok);
    gate2(0);
}

#define MODE3_N 4000

static void check_mode3(void)
{
    gate2(1);
    pit_program(2, 3, MODE3_N);
    int transitions = 0, highs = 0, lows = 0, odd = 0, range = 0;
    int prev = out2();
    uint64_t t0 = pit_ref_clocks();
    while (transitions < 5 && pit_ref_clocks() - t0 < 10 * MODE3_N) {
        int o = out2();
        if (o)
            highs++;
        else
            lows++;
        if (o != prev)
            transitions++;
        prev = o;
        uint16_t c = pit_latch_read(2);
        if (c & 1)
            odd++;
        if (c < 2 || c > MODE3_N)
            range++;
    }
    int ok = expect("OUT2 transitions seen", transitions, 5);
    ok &= expect("samples high", highs > 0, 1);
    ok &= expect("samples low", lows > 0, 1);
    ok &= expect("odd counts (an even N counts down by two)", odd, 0);
    ok &= expect("counts outside 2..N", range, 0);
    report("mode 3: OUT2 toggles (square wave seen in port 0x61 bit 5), an even count decrements by two", ok);
    gate2(0);
}

static void check_bcd(void)
{
    gate2(0);
    outb(PIT_CW, PIT_CWORD(2, PIT_RW_BOTH, 0, 1));
    outb(PIT_CH2, 0x99);
    outb(PIT_CH2, 0x99);
    pit_ref_wait(10, 0);
    uint16_t loaded = pit_latch_read(2);
    outb(PIT_CW, RB_STATUS_CH2);
    uint8_t st = inb(PIT_CH2);
    gate2(1);
    /* Every latched count is BCD (a binary counter shows digits A-F in 6 of
     * every 16 counts). After terminal count the count wraps to 9999. */
    int invalid = 0, moved = 0;
    for (int i = 0; i < 200; i++) {
        uint16_t c = pit_latch_read(2);
        if (!is_bcd(c))
            invalid++;
        if (c != loaded)
            moved++;
    }
    /* Across the 1000 -> 999 boundary, where binary would read 0x0FFx: load
     * 1000 with GATE low, count a few clocks, stop. */
    gate2(0);
    outb(PIT_CW, PIT_CWORD(2, PIT_RW_BOTH, 0, 1));
    outb(PIT_CH2, 0x00);
    outb(PIT_CH2, 0x10);
    pit_ref_wait(10, 0);
    uint16_t before = pit_latch_read(2);
    gate2(1);
    pit_ref_wait(5, 0);
    gate2(0);
    uint16_t after = pit_latch_read(2);
    int ok = expect("count 9999 loaded with GATE low", loaded, 0x9999);
    ok &= expect("status (mode 0, RW 3, BCD)", st & 0x3F, 0x31);
    ok &= expect("latched counts that are not BCD", invalid, 0);
    ok &= expect("latched counts below 9999 (it counts)", moved > 0, 1);
    ok &= expect("count 1000 loaded with GATE low", before, 0x1000);
    ok &= expect_true("count after a few clocks from 1000 is BCD", is_bcd(after));
    ok &= expect_true("and has moved", after != 0x1000);
    if (!ok)
        printf("  count after a few clocks from 1000: 0x%x\n", after);
    report("BCD mode: counts run in BCD (9999 down, 1000 -> 0999), every latched count is valid BCD", ok);
}

int main(void)
{
    pit_ref_start();
    check_status_fields();
    check_access_modes();
    check_mode0();
    check_gate();
    check_mode2();
    check_mode3();
    check_bcd();
    return 0;
}
