/* s3: ACPI suspend to RAM and resume, as an OS does it on QEMU's pc
 * machine with SeaBIOS (ACPI spec 7.4.2, 16.1.3 and 16.3).
 *
 * Before sleeping (64-bit, PASS / FAIL lines): find the FADT and FACS
 * through the RSDP, read \_S3's SLP_TYP from the DSDT, check that a sleep
 * type the platform does not model (S4, SLP_TYP 2) leaves the guest
 * running, write the FACS Firmware_Waking_Vector (0x7008: CS 0x700, IP 8,
 * which checks the segment:offset split), copy the 16-bit resume code
 * there, set PM1_EN.RTC_EN, program the RTC alarm to "don't care" with
 * AIE, store 0 at MARKER and write SLP_EN | SLP_TYP. The loop after the
 * write stores 1 at MARKER: it must never run.
 *
 * After the wake (real mode, IF clear): "S3: resumed" on COM1, then one
 * value to isa-debug-exit: 0 when all is well (process status 1), else the
 * first failed check: 1 MARKER is not 0 (an instruction after the sleep
 * write ran), 2 PM1_STS.WAK_STS clear, 3 PM1_STS.RTC_STS clear (the wake
 * reason), 4 CS is not 0x700, 5 PM1_EN not 0 after the wake's reset, 6 the
 * RTC's AIE survived the reset.
 *
 * With "novector" on the command line the waking vector stays 0: the wake
 * has nowhere to resume, so it is a reset (the run ends with status 0). */
#include "runtime.h"

#define MARKER 0x6000u
#define WAKING_VECTOR 0x7008u

#define RTC_INDEX 0x70
#define RTC_DATA 0x71
#define RTC_SECONDS_ALARM 0x01
#define RTC_MINUTES_ALARM 0x03
#define RTC_HOURS_ALARM 0x05
#define RTC_REG_A 0x0A
#define RTC_REG_B 0x0B
#define RTC_REG_C 0x0C
#define REG_A_UIP 0x80
#define REG_B_AIE 0x20
#define ALARM_DONT_CARE 0xC0

#define PM1_RTC_EN 0x0400
#define PM1_SLP_EN 0x2000

extern const char resume16_start[], resume16_end[];

/* The resume code: 16-bit, position independent but for absolute data
 * addresses (DS = 0 after the reset). */
__asm__(".pushsection .text\n"
        ".code16\n"
        "resume16_start:\n"
        "    movw $0x3f8, %dx\n"
        "    movw $resume16_msg - resume16_start + 8, %si\n"
        "1:  movb %cs:(%si), %al\n"
        "    testb %al, %al\n"
        "    jz 2f\n"
        "    outb %al, %dx\n"
        "    incw %si\n"
        "    jmp 1b\n"
        "2:  xorw %bx, %bx\n"
        /* Checks from the last to the first: the first failure wins. */
        "    movb $0x0b, %al\n"
        "    outb %al, $0x70\n"
        "    inb $0x71, %al\n"
        "    testb $0x20, %al\n"
        "    jz 3f\n"
        "    movw $6, %bx\n"
        "3:  movw $0x602, %dx\n"
        "    inw %dx, %ax\n"
        "    testw %ax, %ax\n"
        "    jz 4f\n"
        "    movw $5, %bx\n"
        "4:  movw %cs, %ax\n"
        "    cmpw $0x700, %ax\n"
        "    je 5f\n"
        "    movw $4, %bx\n"
        "5:  movw $0x600, %dx\n"
        "    inw %dx, %ax\n"
        "    testw $0x0400, %ax\n"
        "    jnz 6f\n"
        "    movw $3, %bx\n"
        "6:  testw $0x8000, %ax\n"
        "    jnz 7f\n"
        "    movw $2, %bx\n"
        "7:  movl 0x6000, %eax\n"
        "    testl %eax, %eax\n"
        "    jz 8f\n"
        "    movw $1, %bx\n"
        "8:  movzwl %bx, %eax\n"
        "    movw $0xf4, %dx\n"
        "    outl %eax, %dx\n"
        "9:  hlt\n"
        "    jmp 9b\n"
        "resume16_msg:\n"
        "    .asciz \"S3: resumed\\n\"\n"
        "resume16_end:\n"
        ".code64\n"
        ".popsection\n");

static uint8_t rtc_in(uint8_t reg)
{
    outb(RTC_INDEX, reg);
    return inb(RTC_DATA);
}

static void rtc_out(uint8_t reg, uint8_t v)
{
    outb(RTC_INDEX, reg);
    outb(RTC_DATA, v);
}

static uint32_t rd32(uint64_t addr) { return *(volatile uint32_t *)addr; }

static int sig_is(uint64_t addr, const char *sig) { return memcmp((const void *)addr, sig, 4) == 0; }

static uint64_t find_rsdp(void)
{
    for (uint64_t a = 0xE0000; a < 0x100000; a += 16)
        if (memcmp((const void *)a, "RSD PTR ", 8) == 0)
            return a;
    return 0;
}

/* The first element of the package named \_S3 in the DSDT's AML (Zero,
 * One or a BytePrefix constant), or -1. */
static int s3_slp_typ(uint64_t dsdt)
{
    uint32_t len = rd32(dsdt + 4);
    const uint8_t *b = (const uint8_t *)dsdt;
    for (uint32_t i = 36; i + 8 < len; i++) {
        if (memcmp(b + i, "_S3_", 4) != 0)
            continue;
        const uint8_t *p = b + i + 4;
        if (p[0] != 0x12) /* PackageOp */
            return -1;
        p += 2 + 1; /* one-byte PkgLength, NumElements */
        switch (p[0]) {
        case 0x00:
            return 0;
        case 0x01:
            return 1;
        case 0x0A:
            return p[1];
        default:
            return -1;
        }
    }
    return -1;
}

static int cmdline_has(const char *word)
{
    size_t n = strlen(word);
    for (const char *p = multiboot_cmdline(); p && *p; p++)
        if (memcmp(p, word, n) == 0)
            return 1;
    return 0;
}

int main(void)
{
    uint64_t rsdp = find_rsdp();
    report("RSDP found in 0xE0000..0xFFFFF", rsdp != 0);
    if (!rsdp)
        exit(summary());
    uint64_t rsdt = rd32(rsdp + 16);
    uint64_t fadt = 0;
    for (uint32_t i = 0; 36 + 4 * i < rd32(rsdt + 4); i++) {
        uint64_t t = rd32(rsdt + 36 + 4 * i);
        if (sig_is(t, "FACP"))
            fadt = t;
    }
    report("FADT in the RSDT", fadt != 0);
    if (!fadt)
        exit(summary());
    uint64_t facs = rd32(fadt + 36);
    uint64_t dsdt = rd32(fadt + 40);
    uint16_t pm1a_evt = (uint16_t)rd32(fadt + 56);
    uint16_t pm1a_cnt = (uint16_t)rd32(fadt + 64);
    printf("FACS at 0x%lx, DSDT at 0x%lx, PM1a_EVT 0x%x, PM1a_CNT 0x%x\n", facs, dsdt, pm1a_evt, pm1a_cnt);
    report("FACS signature", sig_is(facs, "FACS"));
    /* The resume code hard-codes the PM block at 0x600. */
    report("PM1a_EVT_BLK 0x600, PM1a_CNT_BLK 0x604", pm1a_evt == 0x600 && pm1a_cnt == 0x604);
    int slp_typ = s3_slp_typ(dsdt);
    printf("\\_S3 SLP_TYP %d\n", slp_typ);
    report("DSDT declares \\_S3 with SLP_TYP 1 (QEMU's)", slp_typ == 1);
    if (slp_typ < 0 || !sig_is(facs, "FACS"))
        exit(summary());

    /* S4 (SLP_TYP 2) is not modelled: the write is ignored. */
    outw(pm1a_cnt, (2 << 10) | PM1_SLP_EN);
    report("SLP_EN with SLP_TYP 2 (S4): the guest runs on", 1);
    report("SLP_EN reads 0, SCI_EN 1", (inw(pm1a_cnt) & (PM1_SLP_EN | 1)) == 1);

    *(volatile uint32_t *)(facs + 12) = cmdline_has("novector") ? 0 : WAKING_VECTOR;
    memcpy((void *)(uint64_t)WAKING_VECTOR, resume16_start, (size_t)(resume16_end - resume16_start));
    outw(pm1a_evt + 2, PM1_RTC_EN);
    report("PM1_EN.RTC_EN set", inw(pm1a_evt + 2) == PM1_RTC_EN);
    /* Clear any stale status bits (write 1 to clear). */
    outw(pm1a_evt, 0xFFFF);

    /* The alarm at the next update: wait for one to end first, so that a
     * whole second is left. */
    while ((rtc_in(RTC_REG_A) & REG_A_UIP) == 0)
        ;
    while ((rtc_in(RTC_REG_A) & REG_A_UIP) != 0)
        ;
    rtc_in(RTC_REG_C);
    rtc_out(RTC_SECONDS_ALARM, ALARM_DONT_CARE);
    rtc_out(RTC_MINUTES_ALARM, ALARM_DONT_CARE);
    rtc_out(RTC_HOURS_ALARM, ALARM_DONT_CARE);
    rtc_out(RTC_REG_B, rtc_in(RTC_REG_B) | REG_B_AIE);
    int failed = summary();
    if (failed)
        exit(failed);
    printf("s3: entering S3 (SLP_TYP %d)\n", slp_typ);

    *(volatile uint32_t *)(uint64_t)MARKER = 0;
    __asm__ volatile("outw %0, %1" ::"a"((uint16_t)((slp_typ << 10) | PM1_SLP_EN)), "d"(pm1a_cnt) : "memory");
    for (;;)
        *(volatile uint32_t *)(uint64_t)MARKER = 1;
}
