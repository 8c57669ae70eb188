//! Test doubles shared by unit and integration tests: a fake vCPU that
//! records injections and window requests and replays scripted exits.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::cpu::{DebugRegs, Event, FpuState, MpState, Msr, Regs, Sregs, VcpuEvents};
use crate::vcpu::{Kick, Readiness, Vcpu, VcpuExit, VcpuResult};

struct NoKick;
impl Kick for NoKick {
    fn kick(&self) {}
}

/// A processor that does nothing but record what the VMM asked of it.
#[derive(Default)]
pub struct FakeVcpu {
    pub id: u32,
    pub readiness: Readiness,
    /// Events handed over with `inject`, in order.
    pub injected: Vec<Event>,
    pub interrupt_window: bool,
    pub nmi_window: bool,
    /// Returned once by `idt_vectoring`.
    pub vectoring: Option<Event>,
    /// Exits `run` returns, in order; `Shutdown` when empty.
    pub exits: VecDeque<VcpuExit>,
    pub io: Vec<u8>,
    pub mmio: Vec<u8>,
    pub rdmsr_answers: Vec<Option<u64>>,
    pub wrmsr_answers: Vec<bool>,
    pub regs: Regs,
    pub sregs: Sregs,
    pub events: VcpuEvents,
    pub cr8: u64,
}

impl FakeVcpu {
    pub fn new(id: u32) -> Self {
        FakeVcpu {
            id,
            ..Default::default()
        }
    }
}

impl Vcpu for FakeVcpu {
    fn id(&self) -> u32 {
        self.id
    }
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn run(&mut self) -> VcpuResult<VcpuExit> {
        Ok(self.exits.pop_front().unwrap_or(VcpuExit::Shutdown))
    }
    fn io_data(&mut self) -> &mut [u8] {
        &mut self.io
    }
    fn mmio_data(&mut self) -> &mut [u8] {
        &mut self.mmio
    }
    fn complete_rdmsr(&mut self, value: Option<u64>) {
        self.rdmsr_answers.push(value);
    }
    fn complete_wrmsr(&mut self, ok: bool) {
        self.wrmsr_answers.push(ok);
    }
    fn cr8(&mut self) -> u64 {
        self.cr8
    }
    fn set_cr8(&mut self, cr8: u64) {
        self.cr8 = cr8;
    }
    fn readiness(&mut self) -> VcpuResult<Readiness> {
        Ok(self.readiness)
    }
    fn inject(&mut self, event: Event) -> VcpuResult<()> {
        self.injected.push(event);
        Ok(())
    }
    fn set_interrupt_window_exiting(&mut self, on: bool) {
        self.interrupt_window = on;
    }
    fn set_nmi_window_exiting(&mut self, on: bool) {
        self.nmi_window = on;
    }
    fn idt_vectoring(&mut self) -> Option<Event> {
        self.vectoring.take()
    }
    fn get_regs(&mut self) -> VcpuResult<Regs> {
        Ok(self.regs)
    }
    fn set_regs(&mut self, regs: &Regs) -> VcpuResult<()> {
        self.regs = *regs;
        Ok(())
    }
    fn get_sregs(&mut self) -> VcpuResult<Sregs> {
        Ok(self.sregs)
    }
    fn set_sregs(&mut self, sregs: &Sregs) -> VcpuResult<()> {
        self.sregs = *sregs;
        Ok(())
    }
    fn get_debug_regs(&mut self) -> VcpuResult<DebugRegs> {
        Ok(DebugRegs::default())
    }
    fn set_debug_regs(&mut self, _dr: &DebugRegs) -> VcpuResult<()> {
        Ok(())
    }
    fn get_fpu(&mut self) -> VcpuResult<FpuState> {
        Ok(FpuState::default())
    }
    fn set_fpu(&mut self, _fpu: &FpuState) -> VcpuResult<()> {
        Ok(())
    }
    fn get_msrs(&mut self, _indices: &[u32]) -> VcpuResult<Vec<Msr>> {
        Ok(Vec::new())
    }
    fn set_msrs(&mut self, _msrs: &[Msr]) -> VcpuResult<()> {
        Ok(())
    }
    fn get_events(&mut self) -> VcpuResult<VcpuEvents> {
        Ok(self.events)
    }
    fn set_events(&mut self, events: &VcpuEvents) -> VcpuResult<()> {
        self.events = *events;
        Ok(())
    }
    fn get_mp_state(&mut self) -> VcpuResult<MpState> {
        Ok(MpState::Runnable)
    }
    fn set_mp_state(&mut self, _state: MpState) -> VcpuResult<()> {
        Ok(())
    }
    fn kicker(&self) -> Arc<dyn Kick> {
        Arc::new(NoKick)
    }
}
