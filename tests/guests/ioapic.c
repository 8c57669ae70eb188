/* ioapic: the I/O APIC (Intel 82093AA datasheet: IOREGSEL at 0xFEC00000,
 * IOWIN at +0x10, IOAPICID / IOAPICVER, the redirection table; version
 * 0x20's EOI register at +0x40), delivering to the local APIC.
 *
 * The 8259As are fully masked (OCW1 0xFF on both), the xAPIC is enabled.
 * Sources: the PIT's counter 0 (ISA IRQ 0, IOAPIC pin 2 by the MADT's
 * interrupt source override) for edge-triggered entries, and COM1's THRE
 * interrupt (ISA IRQ 4, pin 4) for level-triggered ones: with MCR OUT2 set
 * (it gates INTR onto the ISA line on a PC) and IER ETBEI set, the 16550
 * holds its interrupt asserted as long as the transmit holding register is
 * empty, which is all the time here. Nothing is printed while that
 * interrupt is enabled (writing THR would toggle it).
 *
 * Checks:
 *  - IOAPICVER reads 0x00170020 (maximum redirection entry 23, version
 *    0x20); IOAPICID bits 27:24 are writable; every entry is masked at
 *    entry;
 *  - edge: pin 2 routed to vector 0x30 (fixed, physical destination = our
 *    APIC ID): PIT ticks arrive as 0x30, edge (TMR bit clear), EOI to the
 *    LAPIC; masking the entry stops them (while the PIT keeps reloading);
 *    unmasking brings them back;
 *  - level, active high, vector 0x31: remote IRR (bit 14) is set as soon as
 *    the LAPIC accepted the message and while it is in service (TMR bit
 *    set); a LAPIC EOI with the line still asserted delivers it again;
 *    clearing IER in the handler before the EOI ends it: no redelivery,
 *    remote IRR clear;
 *  - with EOI broadcast suppressed (SVR bit 12, LAPIC version bit 24) the
 *    LAPIC EOI leaves remote IRR set and nothing is redelivered; a write of
 *    the vector to the IOAPIC EOI register clears remote IRR (and, the line
 *    still asserted, redelivers; once the line is low, nothing);
 *  - logical destination mode, flat model (DFR 0xFFFFFFFF, LDR 0x01000000):
 *    destination 0x01 delivers, destination 0x02 does not.
 */
#include "runtime.h"
#include "hw.h"

#define PIN_PIT 2
#define PIN_COM1 4
#define V_EDGE 0x30
#define V_LEVEL 0x31
#define V_LOGICAL 0x32
#define PIT_1KHZ 1193

enum level_mode { LEVEL_CLEAR_ON_3RD, LEVEL_EOI_REGISTER, LEVEL_EOI_ONLY };

static volatile int hits[256];
static volatile int total;
static volatile int edge_tmr_set;
static volatile enum level_mode level_mode;
static volatile int level_remote_irr_clear, level_tmr_clear;
static volatile uint64_t rte_line_low, rte_after_eoi_reg;

static void handler(struct frame *f)
{
    uint8_t v = (uint8_t)f->vector;
    hits[v]++;
    total++;
    if (v == V_EDGE && lapic_vec_bit(LAPIC_TMR, V_EDGE))
        edge_tmr_set++;
    if (v == V_LEVEL) {
        if (!(ioapic_read_rte(PIN_COM1) & RTE_REMOTE_IRR))
            level_remote_irr_clear++;
        if (!lapic_vec_bit(LAPIC_TMR, V_LEVEL))
            level_tmr_clear++;
        if (level_mode == LEVEL_CLEAR_ON_3RD && hits[V_LEVEL] == 3)
            outb(COM1_BASE + UART_IER, 0); /* the UART drops its interrupt */
        if (level_mode == LEVEL_EOI_REGISTER) {
            /* Line low first: that alone leaves remote IRR set. Then the
             * IOAPIC's EOI register, then the LAPIC EOI (whose broadcast
             * then finds nothing to clear). */
            outb(COM1_BASE + UART_IER, 0);
            rte_line_low = ioapic_read_rte(PIN_COM1);
            *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + IOAPIC_EOI_REG) = V_LEVEL;
            rte_after_eoi_reg = ioapic_read_rte(PIN_COM1);
        }
    }
    lapic_eoi();
}

static void spurious_handler(struct frame *f) { hits[f->vector & 0xFF]++; }

static void clear_hits(void)
{
    for (int i = 0; i < 256; i++)
        hits[i] = 0;
    total = 0;
}

static void wait_for(uint8_t vec, int n)
{
    for (int i = 0; i < 100 && hits[vec] < n; i++)
        wait_irq();
}

static void open_windows(int n)
{
    for (int i = 0; i < n; i++)
        open_irq_window();
}

static uint32_t apic_id;

static void check_registers(void)
{
    int ok = expect("IOAPICVER", ioapic_read(IOAPIC_REG_VER), 0x00170020);
    uint32_t id = ioapic_read(IOAPIC_REG_ID);
    ioapic_write(IOAPIC_REG_ID, 0x0A000000);
    ok &= expect("IOAPICID after writing ID 0xA", ioapic_read(IOAPIC_REG_ID) & 0x0F000000, 0x0A000000);
    ioapic_write(IOAPIC_REG_ID, id);
    ok &= expect("IOAPICID restored", ioapic_read(IOAPIC_REG_ID), id);
    int unmasked = 0;
    for (unsigned pin = 0; pin < 24; pin++)
        if (!(ioapic_read_rte(pin) & RTE_MASKED))
            unmasked++;
    ok &= expect("entries not masked at entry", unmasked, 0);
    report("IOAPICVER 0x00170020 (24 entries, version 0x20), IOAPICID writable, all entries masked at entry", ok);
}

static void check_edge(void)
{
    clear_hits();
    edge_tmr_set = 0;
    uint64_t rte = V_EDGE | RTE_DEST(apic_id);
    ioapic_write_rte(PIN_PIT, rte);
    int ok = expect("RTE pin 2 reads back", ioapic_read_rte(PIN_PIT), rte);
    pit_program(0, 2, PIT_1KHZ);
    wait_for(V_EDGE, 5);
    ok &= expect("ticks with vector 0x30", hits[V_EDGE] >= 5, 1);
    ok &= expect("other vectors", total - hits[V_EDGE], 0);
    ok &= expect("handler runs with the TMR bit set (level)", edge_tmr_set, 0);
    ok &= expect_true("LAPIC ISR empty after the EOIs", lapic_vec_none(LAPIC_ISR));
    report("edge: PIT (ISA IRQ 0 -> pin 2) routed to vector 0x30 arrives as 0x30, edge, EOI to the LAPIC", ok);

    ioapic_write_rte(PIN_PIT, rte | RTE_MASKED);
    open_irq_window();
    int before = hits[V_EDGE];
    int reloads = pit_wait_reloads(0, 3, 1);
    int masked = hits[V_EDGE] - before;
    ok = expect("PIT reloads seen", reloads, 3);
    ok &= expect("ticks while the entry is masked", masked, 0);
    ok &= expect("RTE mask bit", (ioapic_read_rte(PIN_PIT) >> 16) & 1, 1);
    ioapic_write_rte(PIN_PIT, rte);
    wait_for(V_EDGE, before + 1);
    ok &= expect("ticks after unmasking", hits[V_EDGE] > before, 1);
    report("masking the redirection entry (bit 16) stops the ticks; unmasking brings them back", ok);
    ioapic_write_rte(PIN_PIT, rte | RTE_MASKED);
    open_irq_window();
}

static void uart_irq_setup(void)
{
    outb(COM1_BASE + UART_IER, 0);
    (void)inb(COM1_BASE + UART_IIR);
    outb(COM1_BASE + UART_MCR, 0x03 | UART_MCR_OUT2); /* DTR | RTS | OUT2 */
}

static void check_level(void)
{
    clear_hits();
    level_remote_irr_clear = level_tmr_clear = 0;
    level_mode = LEVEL_CLEAR_ON_3RD;
    uart_irq_setup();
    uint64_t rte = V_LEVEL | RTE_LEVEL | RTE_DEST(apic_id);
    ioapic_write_rte(PIN_COM1, rte);
    uint64_t idle = ioapic_read_rte(PIN_COM1);
    /* Assert the line: the entry delivers once and waits for the EOI. */
    outb(COM1_BASE + UART_IER, UART_IER_ETBEI);
    uint64_t pending = ioapic_read_rte(PIN_COM1);
    int irr = lapic_vec_bit(LAPIC_IRR, V_LEVEL);
    int tmr = lapic_vec_bit(LAPIC_TMR, V_LEVEL);
    open_irq_window();
    int first = hits[V_LEVEL];
    for (int i = 0; i < 10 && hits[V_LEVEL] < 3; i++)
        open_irq_window();
    int served = hits[V_LEVEL];
    open_windows(5);
    int after = hits[V_LEVEL];
    uint64_t end = ioapic_read_rte(PIN_COM1);
    int ok = expect("RTE before the line rose", idle, rte);
    ok &= expect("remote IRR once the LAPIC accepted it", (pending >> 14) & 1, 1);
    ok &= expect("LAPIC IRR bit", irr, 1);
    ok &= expect("LAPIC TMR bit (level)", tmr, 1);
    /* (A VMM with exact interrupt windows may deliver the next one right
     * after the handler's IRETQ, still inside the same window.) */
    ok &= expect("interrupts in the first window", first >= 1, 1);
    ok &= expect("handler runs with remote IRR clear", level_remote_irr_clear, 0);
    ok &= expect("handler runs with the TMR bit clear", level_tmr_clear, 0);
    report("level, active high (COM1 THRE, pin 4): one interrupt, remote IRR set while in service", ok);
    ok = expect("interrupts until the handler cleared IER", served, 3);
    report("level: a LAPIC EOI with the line still asserted delivers the interrupt again", ok);
    ok = expect("interrupts after IER was cleared", after, 3);
    ok &= expect("remote IRR at the end", (end >> 14) & 1, 0);
    ok &= expect("other vectors", total - hits[V_LEVEL], 0);
    report("level: IER cleared in the handler before the EOI: no redelivery, remote IRR clear", ok);
}

static void check_eoi_register(void)
{
    /* In the handler: line low, then the EOI register clears remote IRR. */
    clear_hits();
    level_remote_irr_clear = 0;
    level_mode = LEVEL_EOI_REGISTER;
    rte_line_low = rte_after_eoi_reg = ~0ull;
    outb(COM1_BASE + UART_IER, UART_IER_ETBEI);
    open_windows(3);
    int ok = expect("interrupts", hits[V_LEVEL], 1);
    ok &= expect("remote IRR in the handler after the line went low", (rte_line_low >> 14) & 1, 1);
    ok &= expect("remote IRR after the write of 0x31 to the EOI register", (rte_after_eoi_reg >> 14) & 1, 0);
    ok &= expect("remote IRR at the end", (ioapic_read_rte(PIN_COM1) >> 14) & 1, 0);
    ok &= expect("handler runs with remote IRR clear", level_remote_irr_clear, 0);
    report("IOAPIC EOI register (0x40): writing the vector clears remote IRR (the line going low does not)", ok);

    /* With the LAPIC's EOI broadcast suppressed, only the EOI register
     * ends the level interrupt at the IOAPIC. */
    if (!(lapic_read(LAPIC_VERSION) & (1u << 24))) {
        printf("  (LAPIC version 0x%x has no EOI-broadcast suppression: directed-EOI check skipped)\n",
               lapic_read(LAPIC_VERSION));
        ioapic_write_rte(PIN_COM1, RTE_MASKED);
        outb(COM1_BASE + UART_MCR, 0x03);
        return;
    }
    clear_hits();
    level_remote_irr_clear = 0;
    level_mode = LEVEL_EOI_ONLY;
    lapic_write(LAPIC_SVR, SVR_ENABLE | (1u << 12) | 0xFF);
    uint32_t svr = lapic_read(LAPIC_SVR);
    outb(COM1_BASE + UART_IER, UART_IER_ETBEI);
    open_irq_window();
    int first = hits[V_LEVEL];
    uint64_t after_lapic_eoi = ioapic_read_rte(PIN_COM1);
    open_windows(3);
    int held = hits[V_LEVEL];
    /* EOI register with the line still asserted: remote IRR clears, the
     * entry sends again. */
    *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + IOAPIC_EOI_REG) = V_LEVEL;
    open_irq_window();
    int again = hits[V_LEVEL];
    /* Line low, then the EOI register: remote IRR clears, nothing more. */
    outb(COM1_BASE + UART_IER, 0);
    uint64_t before_eoi_reg = ioapic_read_rte(PIN_COM1);
    *(volatile uint32_t *)(uintptr_t)(IOAPIC_BASE + IOAPIC_EOI_REG) = V_LEVEL;
    uint64_t after_eoi_reg = ioapic_read_rte(PIN_COM1);
    open_windows(3);
    int end = hits[V_LEVEL];
    lapic_enable(0xFF);

    ok = expect("SVR with EOI-broadcast suppression", svr, 0x11FF);
    ok &= expect("interrupts in the first window", first, 1);
    ok &= expect("remote IRR after the LAPIC EOI (not broadcast)", (after_lapic_eoi >> 14) & 1, 1);
    ok &= expect("interrupts while remote IRR stays set", held, 1);
    ok &= expect("interrupts after the EOI register, line asserted", again, 2);
    ok &= expect("remote IRR before the last EOI-register write", (before_eoi_reg >> 14) & 1, 1);
    ok &= expect("remote IRR after the EOI-register write", (after_eoi_reg >> 14) & 1, 0);
    ok &= expect("interrupts at the end", end, 2);
    ok &= expect("handler runs with remote IRR clear", level_remote_irr_clear, 0);
    report("EOI broadcast suppressed (SVR bit 12): remote IRR stays set after the LAPIC EOI, the EOI register ends it", ok);
    ioapic_write_rte(PIN_COM1, RTE_MASKED);
    outb(COM1_BASE + UART_MCR, 0x03);
}

static void check_logical(void)
{
    clear_hits();
    lapic_write(LAPIC_DFR, 0xFFFFFFFF);
    lapic_write(LAPIC_LDR, 0x01000000);
    int ok = expect("DFR (flat)", lapic_read(LAPIC_DFR), 0xFFFFFFFF);
    ok &= expect("LDR", lapic_read(LAPIC_LDR), 0x01000000);
    ioapic_write_rte(PIN_PIT, V_LOGICAL | RTE_DEST_LOGICAL | RTE_DEST(0x01));
    wait_for(V_LOGICAL, 3);
    ok &= expect("ticks with vector 0x32, logical destination 0x01", hits[V_LOGICAL] >= 3, 1);
    ok &= expect("other vectors", total - hits[V_LOGICAL], 0);
    ioapic_write_rte(PIN_PIT, V_LOGICAL | RTE_DEST_LOGICAL | RTE_DEST(0x02));
    open_irq_window();
    int before = hits[V_LOGICAL];
    int reloads = pit_wait_reloads(0, 3, 1);
    ok &= expect("PIT reloads seen", reloads, 3);
    ok &= expect("ticks with logical destination 0x02 (not ours)", hits[V_LOGICAL] - before, 0);
    report("logical destination, flat model: LDR bit 0 receives destination 0x01, not 0x02", ok);
    ioapic_write_rte(PIN_PIT, RTE_MASKED);
}

int main(void)
{
    for (unsigned v = 0x20; v < 0xF0; v++)
        set_handler(v, handler);
    set_handler(0xFF, spurious_handler);
    pic_init(0x20, 0x28, ICW4_8086, 0xFF, 0xFF);
    lapic_enable(0xFF);
    apic_id = lapic_read(LAPIC_ID) >> 24;

    check_registers();
    check_edge();
    check_level();
    check_eoi_register();
    check_logical();
    ioapic_mask_all();
    report("no spurious-vector interrupt", expect("spurious interrupts", hits[0xFF], 0));
    return 0;
}
