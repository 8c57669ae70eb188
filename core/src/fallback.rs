//! What Tandem does when a processor gives up on an instruction.
//!
//! Some KVMs cannot execute every instruction a guest runs: PVM's emulator,
//! for one, stops on INT3 at ring 0. The instructions that only deliver an
//! event through the IDT (INT3, INT n, INTO, INT1) are finished here on any
//! backend: the gate checks a software interrupt makes (SDM vol. 3, 6.12.1.1:
//! the gate's DPL must be at least the CPL for INT n / INT3 / INTO, else
//! #GP(vector * 8 + 2); vector beyond the IDT limit, #GP(vector * 8 + 2)) and
//! then the event with the instruction's length, so the return address
//! points past it, as a trap does. Everything else waits for the interpreter
//! (which will execute one instruction on the shared machine and hand the
//! vCPU back).

use crate::cpu::{cr0, rflags, Event, EventKind, Regs, Sregs};
use crate::machine::{Machine, RunError};
use crate::memory::GuestMemory;
use crate::paging::read_linear;
use crate::vcpu::{Vcpu, VcpuResult};

/// Another processor that executes, on the same machine, one instruction the
/// vCPU's own processor could not emulate. Core knows only this interface;
/// the interpreter backend implements it.
pub trait InstructionFallback: Send + Sync {
    /// Executes the instruction at `vcpu`'s CS:RIP: takes the vCPU's state,
    /// retires exactly that instruction (completing its port, MMIO and MSR
    /// accesses through `machine`) and loads the resulting state back.
    /// `Ok(Some(description))` (mnemonic, for the once-per-instruction note)
    /// when it did; `Ok(None)` when it does not handle that instruction;
    /// an error when the state cannot be carried exactly.
    fn execute_one(
        &self,
        machine: &Machine,
        vcpu: &mut dyn Vcpu,
    ) -> Result<Option<String>, RunError>;
}

/// An instruction the fallback knows how to finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventInstruction {
    Int3,
    IntN(u8),
    Into,
    Int1,
}

/// Decodes the instruction at the start of `bytes` (legacy prefixes other
/// than segment overrides make it unknown).
pub fn decode_event_instruction(bytes: &[u8]) -> Option<(EventInstruction, u8)> {
    let mut i = 0;
    // Segment overrides and operand/address-size prefixes do not change
    // these instructions.
    while let Some(&b) = bytes.get(i) {
        if matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67) && i < 14 {
            i += 1;
        } else {
            break;
        }
    }
    let op = *bytes.get(i)?;
    let len = |n: usize| (i + n) as u8;
    match op {
        0xcc => Some((EventInstruction::Int3, len(1))),
        0xcd => Some((EventInstruction::IntN(*bytes.get(i + 1)?), len(2))),
        0xce => Some((EventInstruction::Into, len(1))),
        0xf1 => Some((EventInstruction::Int1, len(1))),
        _ => None,
    }
}

/// The event an instruction delivers in the current state, after the gate
/// checks; `None` when it delivers nothing (INTO with OF clear).
pub fn event_for(
    mem: &GuestMemory,
    regs: &Regs,
    sregs: &Sregs,
    insn: EventInstruction,
    len: u8,
) -> Option<Event> {
    let (vector, kind, check_dpl) = match insn {
        EventInstruction::Int3 => (3, EventKind::SoftwareException, true),
        EventInstruction::IntN(v) => (v, EventKind::SoftwareInterrupt, true),
        EventInstruction::Into => {
            if sregs.long_mode() && sregs.cs.l {
                return Some(Event::exception(6, None));
            }
            if regs.rflags & (1 << 11) == 0 {
                return None;
            }
            (4, EventKind::SoftwareException, true)
        }
        EventInstruction::Int1 => (1, EventKind::PrivilegedSoftwareException, false),
    };
    let gp = Event::exception(13, Some(u32::from(vector) * 8 + 2));
    if sregs.cr0 & cr0::PE != 0 && regs.rflags & rflags::VM == 0 {
        let entry = if sregs.long_mode() { 16u64 } else { 8 };
        let off = u64::from(vector) * entry;
        if off + entry - 1 > u64::from(sregs.idt.limit) {
            return Some(gp);
        }
        let mut d = [0u8; 8];
        if read_linear(mem, sregs, sregs.idt.base + off, &mut d) != 8 {
            // The IDT is unreadable: let the processor fault on delivery.
        } else {
            let access = d[5];
            let dpl = (access >> 5) & 3;
            if check_dpl && dpl < sregs.cpl() {
                return Some(gp);
            }
            if access & 0x80 == 0 {
                return Some(Event::exception(11, Some(u32::from(vector) * 8 + 2)));
            }
        }
    }
    Some(Event {
        kind,
        vector,
        error_code: None,
        instruction_len: len,
    })
}

/// Tries to finish the instruction at the vCPU's CS:RIP. Returns the
/// instruction handled, or `None` when the fallback cannot.
pub fn finish_event_instruction(
    mem: &GuestMemory,
    vcpu: &mut dyn Vcpu,
) -> VcpuResult<Option<EventInstruction>> {
    let regs = vcpu.get_regs()?;
    let sregs = vcpu.get_sregs()?;
    let mut bytes = [0u8; 15];
    let n = read_linear(
        mem,
        &sregs,
        sregs.cs.base.wrapping_add(regs.rip),
        &mut bytes,
    );
    let Some((insn, len)) = decode_event_instruction(&bytes[..n]) else {
        return Ok(None);
    };
    let ev = event_for(mem, &regs, &sregs, insn, len);
    match ev {
        Some(ev) => vcpu.inject(ev)?,
        None => {
            let mut r = regs;
            r.rip = r.rip.wrapping_add(u64::from(len));
            vcpu.set_regs(&r)?;
        }
    }
    Ok(Some(insn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{efer, Segment};

    #[test]
    fn decodes_event_instructions() {
        assert_eq!(
            decode_event_instruction(&[0xcc]),
            Some((EventInstruction::Int3, 1))
        );
        assert_eq!(
            decode_event_instruction(&[0x2e, 0xcd, 0x80]),
            Some((EventInstruction::IntN(0x80), 3))
        );
        assert_eq!(decode_event_instruction(&[0xcd]), None);
        assert_eq!(decode_event_instruction(&[0x90]), None);
        assert_eq!(decode_event_instruction(&[0x66; 20]), None);
    }

    fn long_mode(mem: &GuestMemory, dpl3_vector: u8) -> (Regs, Sregs) {
        // Identity map: paging off is enough for the IDT read here.
        let mut s = Sregs {
            cr0: cr0::PE,
            efer: efer::LME | efer::LMA,
            cs: Segment::flat(8, 0xb, true),
            ..Default::default()
        };
        s.idt.base = 0x1000;
        s.idt.limit = 0xfff;
        for v in 0..=255u64 {
            let dpl: u8 = if v as u8 == dpl3_vector { 3 } else { 0 };
            mem.write_u8(0x1000 + v * 16 + 5, 0x8e | (dpl << 5))
                .unwrap();
        }
        (Regs::default(), s)
    }

    #[test]
    fn gate_dpl_and_limit_checks() {
        let mem = GuestMemory::new(1 << 20).unwrap();
        let (r, mut s) = long_mode(&mem, 0x80);
        let ev = event_for(&mem, &r, &s, EventInstruction::Int3, 1).unwrap();
        assert_eq!(ev.kind, EventKind::SoftwareException);
        assert_eq!((ev.vector, ev.instruction_len), (3, 1));
        s.cs.dpl = 3;
        let ev = event_for(&mem, &r, &s, EventInstruction::IntN(0x82), 2).unwrap();
        assert_eq!(ev, Event::exception(13, Some(0x82 * 8 + 2)));
        let ev = event_for(&mem, &r, &s, EventInstruction::IntN(0x80), 2).unwrap();
        assert_eq!(ev.kind, EventKind::SoftwareInterrupt);
        // INT1 ignores the gate DPL.
        let ev = event_for(&mem, &r, &s, EventInstruction::Int1, 1).unwrap();
        assert_eq!(ev.vector, 1);
        s.idt.limit = 0x7f;
        let ev = event_for(&mem, &r, &s, EventInstruction::IntN(0x80), 2).unwrap();
        assert_eq!(ev, Event::exception(13, Some(0x402)));
        // INTO is #UD in 64-bit mode.
        let ev = event_for(&mem, &r, &s, EventInstruction::Into, 1).unwrap();
        assert_eq!(ev, Event::exception(6, None));
    }

    mod dispatch {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;

        use crate::fallback::InstructionFallback;
        use crate::machine::{ExitStats, Machine, RunError, RunOutcome};
        use crate::pc::{ClockKind, IrqchipKind, Pc, PcConfig};
        use crate::testing::FakeVcpu;
        use crate::vcpu::{Vcpu, VcpuExit};

        /// Finishes the instruction by writing `value` to isa-debug-exit
        /// through the machine (as the interpreter's OUT exit would) and
        /// stepping RIP over 4 bytes; `None` after `handles` calls.
        struct FakeFallback {
            calls: AtomicU32,
            handles: u32,
            value: u8,
        }

        impl InstructionFallback for FakeFallback {
            fn execute_one(
                &self,
                machine: &Machine,
                vcpu: &mut dyn Vcpu,
            ) -> Result<Option<String>, RunError> {
                if self.calls.fetch_add(1, Ordering::SeqCst) >= self.handles {
                    return Ok(None);
                }
                let exit = VcpuExit::IoOut {
                    port: 0xf4,
                    size: 1,
                    count: 1,
                };
                vcpu.io_data()[0] = self.value;
                let mut stats = ExitStats::default();
                assert!(machine.handle_data_exit(vcpu, &exit, &mut stats));
                assert!(!machine.handle_data_exit(vcpu, &VcpuExit::Hlt, &mut stats));
                assert_eq!(stats.io, 1);
                let mut r = vcpu.get_regs()?;
                r.rip += 4;
                vcpu.set_regs(&r)?;
                Ok(Some("lock cmpxchg16b".into()))
            }
        }

        fn pc() -> Pc {
            Pc::new(PcConfig {
                mem_size: 1 << 20,
                vcpus: 1,
                clock: ClockKind::Host,
                irqchip: IrqchipKind::User,
                lost_ticks: Default::default(),
                serial_out: Box::new(std::io::sink()),
                devices: Vec::new(),
            })
            .unwrap()
        }

        fn failing_vcpu() -> FakeVcpu {
            let mut v = FakeVcpu::new(0);
            v.io = vec![0];
            // RAM at CS:RIP is zero: `add [rax], al`, not an event
            // instruction, so the event fast path passes it on.
            v.regs.rip = 0x1000;
            v.exits.push_back(VcpuExit::EmulationFailure {
                insn: vec![0xf0, 0x48, 0x0f, 0xc7],
            });
            v
        }

        #[test]
        fn emulation_failure_goes_to_the_fallback_and_its_exits_to_the_machine() {
            let pc = pc();
            let fb = Arc::new(FakeFallback {
                calls: AtomicU32::new(0),
                handles: 1,
                value: 0x21,
            });
            assert!(pc.machine.fallback.set(fb.clone()).is_ok());
            let mut v = failing_vcpu();
            let mut stats = ExitStats::default();
            let out = pc.machine.run_vcpu(&mut v, &mut stats).unwrap();
            assert!(matches!(out, RunOutcome::Stop(_)), "{out:?}");
            assert_eq!(out.exit_status(), (0x21 << 1) | 1);
            assert_eq!(stats.fallbacks, 1);
            assert_eq!(v.regs.rip, 0x1004);
            assert_eq!(fb.calls.load(Ordering::SeqCst), 1);
        }

        #[test]
        fn declined_or_missing_fallback_reports_the_emulation_failure() {
            for with_fallback in [false, true] {
                let pc = pc();
                if with_fallback {
                    let fb = Arc::new(FakeFallback {
                        calls: AtomicU32::new(0),
                        handles: 0,
                        value: 0,
                    });
                    assert!(pc.machine.fallback.set(fb).is_ok());
                }
                let mut v = failing_vcpu();
                let mut stats = ExitStats::default();
                let err = pc.machine.run_vcpu(&mut v, &mut stats).unwrap_err();
                assert!(
                    matches!(&err, RunError::EmulationFailure { bytes, .. } if bytes == "f0 48 0f c7"),
                    "{err}"
                );
                assert_eq!(stats.fallbacks, 0);
            }
        }
    }
}
