//! The interpreter as the instruction fallback of another processor.
//!
//! When KVM stops on an instruction it cannot emulate, the run loop hands
//! the vCPU to [`InterpFallback`]: it copies the vCPU's architectural state
//! into an interpreter processor over the same guest memory, retires that
//! one instruction (its port, MMIO and MSR accesses go to the same machine
//! as the run loop's), and copies back what changed.

use std::collections::HashMap;
use std::sync::Mutex;

use tandem_core::cpu::{msr, Msr, VcpuState};
use tandem_core::fallback::InstructionFallback;
use tandem_core::machine::{ExitStats, Machine, RunError};
use tandem_core::paging::read_linear;
use tandem_core::vcpu::{Vcpu, VcpuExit};

use iced_x86::CpuidFeature;
use tandem_core::cpuid::CpuidTable;

use crate::InterpVcpu;

/// Port, MMIO and MSR exits one instruction may make: as many as the
/// interpreter's replay log holds.
const MAX_EXITS: usize = crate::REPLAY_MAX;

/// Executes, with the interpreter, single instructions another processor
/// gave up on. One interpreter processor per vCPU index, kept between
/// calls (its decode cache and TLB are large to build).
#[derive(Default)]
pub struct InterpFallback {
    vcpus: Mutex<HashMap<u32, Box<InterpVcpu>>>,
    /// The CPUID of the processor it stands in for.
    cpuid: Option<std::sync::Arc<tandem_core::cpuid::CpuidTable>>,
}

impl std::fmt::Debug for InterpFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterpFallback").finish_non_exhaustive()
    }
}

impl InterpFallback {
    pub fn new() -> InterpFallback {
        InterpFallback::default()
    }

    /// A fallback whose processors report `table` from CPUID: the table of
    /// the KVM VM it stands in for, so an instruction it executes (CPUID
    /// included) behaves as on that VM.
    pub fn with_cpuid(table: std::sync::Arc<tandem_core::cpuid::CpuidTable>) -> InterpFallback {
        InterpFallback {
            cpuid: Some(table),
            ..InterpFallback::default()
        }
    }
}

fn refuse(what: String) -> RunError {
    RunError::Unhandled(format!("instruction fallback: {what}"))
}

/// The MSRs compared and carried: the transferred set without the TSC (it
/// runs on; writing back the value read earlier would move it backwards).
fn carried(msrs: &[Msr]) -> impl Iterator<Item = &Msr> {
    msrs.iter().filter(|m| m.index != msr::IA32_TSC)
}

/// The instruction at CS:RIP, or `None` when it does not decode.
fn decode(machine: &Machine, st: &VcpuState) -> Option<iced_x86::Instruction> {
    let mut bytes = [0u8; 15];
    let n = read_linear(
        &machine.mem,
        &st.sregs,
        st.sregs.cs.base.wrapping_add(st.regs.rip),
        &mut bytes,
    );
    let s = &st.sregs;
    let bitness = tandem_decoder::bitness(
        s.long_mode(),
        s.cs.l,
        s.cs.db,
        s.cr0 & tandem_core::cpu::cr0::PE != 0,
    );
    tandem_decoder::decode_at_zero(&bytes[..n], bitness)
}

/// The instruction as "[lock ]mnemonic".
fn describe(i: &iced_x86::Instruction) -> String {
    let lock = if i.has_lock_prefix() { "lock " } else { "" };
    format!("{lock}{:?}", i.mnemonic()).to_lowercase()
}

/// Where CPUID announces `f`: (leaf, subleaf, register EAX=0..EDX=3, bit);
/// `None` for the features this table does not follow.
fn feature_bit(f: CpuidFeature) -> Option<(u32, u32, usize, u32)> {
    use CpuidFeature as F;
    Some(match f {
        F::SSE3 => (1, 0, 2, 0),
        F::PCLMULQDQ => (1, 0, 2, 1),
        F::MONITOR => (1, 0, 2, 3),
        F::VMX => (1, 0, 2, 5),
        F::SSSE3 => (1, 0, 2, 9),
        F::FMA => (1, 0, 2, 12),
        F::SSE4_1 => (1, 0, 2, 19),
        F::SSE4_2 => (1, 0, 2, 20),
        F::MOVBE => (1, 0, 2, 22),
        F::POPCNT => (1, 0, 2, 23),
        F::AES => (1, 0, 2, 25),
        F::XSAVE => (1, 0, 2, 26),
        F::AVX => (1, 0, 2, 28),
        F::F16C => (1, 0, 2, 29),
        F::RDRAND => (1, 0, 2, 30),
        F::FSGSBASE => (7, 0, 1, 0),
        F::BMI1 => (7, 0, 1, 3),
        F::AVX2 => (7, 0, 1, 5),
        F::BMI2 => (7, 0, 1, 8),
        F::INVPCID => (7, 0, 1, 10),
        F::RTM => (7, 0, 1, 11),
        F::AVX512F => (7, 0, 1, 16),
        F::RDSEED => (7, 0, 1, 18),
        F::ADX => (7, 0, 1, 19),
        F::SMAP => (7, 0, 1, 20),
        F::CLFLUSHOPT => (7, 0, 1, 23),
        F::CLWB => (7, 0, 1, 24),
        F::SHA => (7, 0, 1, 29),
        F::PKU => (7, 0, 2, 3),
        F::WAITPKG => (7, 0, 2, 5),
        F::CET_SS => (7, 0, 2, 7),
        F::RDPID => (7, 0, 2, 22),
        F::MOVDIRI => (7, 0, 2, 27),
        F::SERIALIZE => (7, 0, 3, 14),
        F::XSAVEOPT => (0xd, 1, 0, 0),
        F::XSAVEC => (0xd, 1, 0, 1),
        F::XSAVES => (0xd, 1, 0, 3),
        F::LZCNT => (0x8000_0001, 0, 2, 5),
        F::SVM => (0x8000_0001, 0, 2, 2),
        F::PREFETCHW => (0x8000_0001, 0, 2, 8),
        F::SYSCALL => (0x8000_0001, 0, 3, 11),
        F::RDTSCP => (0x8000_0001, 0, 3, 27),
        F::RDPRU => (0x8000_0008, 0, 1, 4),
        _ => return None,
    })
}

/// A CPUID feature `i` needs that `table` does not announce: the processor
/// raises #UD for it (SDM vol. 2, each instruction's "#UD If CPUID.xx = 0").
fn missing_feature(i: &iced_x86::Instruction, table: &CpuidTable) -> Option<CpuidFeature> {
    i.cpuid_features().iter().copied().find(|&f| {
        feature_bit(f).is_some_and(|(leaf, sub, reg, bit)| {
            table
                .raw(leaf, sub)
                .get(reg)
                .is_some_and(|v| v & (1 << bit) == 0)
        })
    })
}

impl InstructionFallback for InterpFallback {
    fn execute_one(
        &self,
        machine: &Machine,
        vcpu: &mut dyn Vcpu,
    ) -> Result<Option<String>, RunError> {
        let before = vcpu.get_state()?;
        let ev = &before.events;
        if ev.exception.is_some() || ev.interrupt.is_some() || ev.nmi_injected {
            return Err(refuse(format!(
                "the vCPU has an event in delivery ({ev:?}); the interpreter would deliver it \
                 instead of executing the instruction"
            )));
        }
        if ev.smm {
            return Err(refuse("the vCPU is in SMM".into()));
        }
        // An instruction that does not decode is an invalid encoding: the
        // interpreter's fetch raises #UD for it, as the processor does.
        let insn = decode(machine, &before);
        let what = insn
            .as_ref()
            .map_or_else(|| "an invalid instruction (#UD)".to_string(), describe);

        let id = vcpu.id();
        let mut map = machine_lock(&self.vcpus);
        let iv = map.entry(id).or_insert_with(|| {
            let mut v = Box::new(InterpVcpu::new(id, machine.mem.clone()));
            if let Some(t) = &self.cpuid {
                v.set_cpuid(t.clone());
            }
            v
        });
        iv.set_state(&before)?;

        // What the interpreter cannot hold it would silently change.
        let loaded = iv.get_state()?;
        if loaded.regs != before.regs {
            return Err(refuse(format!(
                "RFLAGS {:#x} has bits the interpreter cannot hold",
                before.regs.rflags
            )));
        }
        if loaded.sregs != before.sregs {
            return Err(refuse("the segment / control registers differ".into()));
        }
        if loaded.fpu != before.fpu {
            return Err(refuse("the x87/SSE/XSAVE state differs".into()));
        }
        for m in carried(&before.msrs) {
            if !loaded.msrs.contains(m) {
                return Err(refuse(format!("MSR {:#x} is not held", m.index)));
            }
        }

        let unimplemented = iv.unimplemented_hits();
        let mut stats = ExitStats::default();
        let mut exits = 0;
        loop {
            match iv.step_one()? {
                None | Some(VcpuExit::Hlt) => break,
                Some(e) => {
                    exits += 1;
                    if exits > MAX_EXITS || !machine.handle_data_exit(&mut **iv, &e, &mut stats) {
                        return Err(refuse(format!("the interpreter ended {what} with {e:?}")));
                    }
                }
            }
        }
        let mut what = what;
        if iv.unimplemented_hits() != unimplemented {
            // It delivered #UD. That is the processor's answer when the
            // guest's CPUID does not offer the instruction's feature; when it
            // does, the interpreter merely lacks it: undo by not copying
            // anything back.
            match insn.as_ref().and_then(|i| missing_feature(i, &iv.cpuid)) {
                Some(f) => what = format!("{what} (#UD: CPUID lacks {f:?})"),
                None => return Err(refuse(format!("the interpreter does not implement {what}"))),
            }
        }

        let after = iv.get_state()?;
        vcpu.set_regs(&after.regs)?;
        if after.sregs != before.sregs {
            vcpu.set_sregs(&after.sregs)?;
        }
        if after.debug != before.debug {
            vcpu.set_debug_regs(&after.debug)?;
        }
        if after.fpu != before.fpu {
            vcpu.set_fpu(&after.fpu)?;
        }
        let changed: Vec<Msr> = carried(&after.msrs)
            .filter(|m| !before.msrs.contains(m))
            .copied()
            .collect();
        if !changed.is_empty() {
            vcpu.set_msrs(&changed)?;
        }
        if after.events.interruptibility != before.events.interruptibility {
            let mut e = before.events;
            e.interruptibility = after.events.interruptibility;
            vcpu.set_events(&e)?;
        }
        Ok(Some(what))
    }
}

fn machine_lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode64(bytes: &[u8]) -> iced_x86::Instruction {
        tandem_decoder::decode_at_zero(bytes, 64).expect("decodes")
    }

    #[test]
    fn an_instruction_of_a_feature_cpuid_lacks_is_ud() {
        let model = CpuidTable::model(1);
        // RDPRU (AMD, CPUID 8000_0008h:EBX[4]): not in Tandem's Intel model.
        let rdpru = decode64(&[0x0f, 0x01, 0xfd]);
        assert_eq!(rdpru.mnemonic(), iced_x86::Mnemonic::Rdpru);
        assert_eq!(missing_feature(&rdpru, &model), Some(CpuidFeature::RDPRU));
        // An instruction of the base architecture lacks nothing.
        let add = decode64(&[0x48, 0x01, 0xd8]);
        assert_eq!(missing_feature(&add, &model), None);
    }

    #[test]
    fn a_feature_follows_its_cpuid_bit() {
        // INVPCID (CPUID.(7,0):EBX[10]): missing exactly when the bit is clear.
        let invpcid = decode64(&[0x66, 0x0f, 0x38, 0x82, 0x01]);
        let model = CpuidTable::model(1);
        let offered = model.raw(7, 0)[1] & (1 << 10) != 0;
        assert_eq!(
            missing_feature(&invpcid, &model).is_none(),
            offered,
            "INVPCID offered: {offered}"
        );
        assert_eq!(
            feature_bit(CpuidFeature::INVPCID),
            Some((7, 0, 1, 10)),
            "SDM vol. 2, INVPCID"
        );
        assert_eq!(feature_bit(CpuidFeature::MOVBE), Some((1, 0, 2, 22)));
    }
}
