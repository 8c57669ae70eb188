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

use crate::InterpVcpu;

/// Port, MMIO and MSR exits one instruction may make (the interpreter's
/// replay log holds 8).
const MAX_EXITS: usize = 16;

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

/// The instruction at CS:RIP as "[lock ]mnemonic", or `None` when it does
/// not decode.
fn describe(machine: &Machine, st: &VcpuState) -> Option<String> {
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
    let i = tandem_decoder::decode_at_zero(&bytes[..n], bitness)?;
    let lock = if i.has_lock_prefix() { "lock " } else { "" };
    Some(format!("{lock}{:?}", i.mnemonic()).to_lowercase())
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
        let Some(what) = describe(machine, &before) else {
            return Ok(None);
        };

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

        let unimplemented = iv.unimplemented_count();
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
        if iv.unimplemented_count() != unimplemented {
            // It delivered #UD: undo by not copying anything back.
            return Err(refuse(format!("the interpreter does not implement {what}")));
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
