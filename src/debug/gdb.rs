//! The GDB remote stub (`--gdb ADDR`), with the `gdbstub` crate, on either
//! processor.
//!
//! The target is x86-64 (gdbstub_arch's core and SSE registers) with two
//! more features in its target description: the segment bases (fs_base,
//! gs_base, k_gs_base) and the system registers (cr0, cr2, cr3, cr4, cr8,
//! efer), as QEMU's stub offers them, so `info registers cr0` works.
//! A 32-bit or real-mode guest is shown through the same 64-bit
//! description (the upper halves read 0); memory addresses are linear
//! addresses, translated through the guest's paging.
//!
//! Software and hardware breakpoints are both the engine's address
//! breakpoints (KVM: the four debug registers; the interpreter: any
//! number), so no INT3 is written into guest memory. `monitor CMD` runs a
//! `tandem debug` command (`monitor info pic`, `monitor break vector 0x20`,
//! `monitor switch interp`...).

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use gdbstub::common::Signal;
use gdbstub::stub::{run_blocking, DisconnectReason, GdbStub, SingleThreadStopReason};
use gdbstub::target::ext::base::singlethread::{
    SingleThreadBase, SingleThreadResume, SingleThreadResumeOps, SingleThreadSingleStep,
    SingleThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, SwBreakpoint, SwBreakpointOps,
};
use gdbstub::target::ext::monitor_cmd::{outputln, ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;

use super::commands::{execute, Flow};
use super::engine::{BpKind, Resume, Session, Stop};

/// x86-64 with the segment bases and system registers.
pub enum X86_64System {}

/// The registers gdb reads with `g`: gdbstub_arch's core + SSE set, then
/// fs_base, gs_base, k_gs_base, cr0, cr2, cr3, cr4, cr8, efer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SystemRegs {
    pub core: X86_64CoreRegs,
    /// fs_base, gs_base, k_gs_base, cr0, cr2, cr3, cr4, cr8, efer.
    pub sys: [u64; 9],
}

/// Bytes of the core + SSE part of the `g` packet.
const CORE_BYTES: usize = 0x218;

impl gdbstub::arch::Registers for SystemRegs {
    type ProgramCounter = u64;
    fn pc(&self) -> u64 {
        self.core.rip
    }
    fn gdb_serialize(&self, mut write_byte: impl FnMut(Option<u8>)) {
        self.core.gdb_serialize(&mut write_byte);
        for r in &self.sys {
            for b in r.to_le_bytes() {
                write_byte(Some(b));
            }
        }
    }
    fn gdb_deserialize(&mut self, bytes: &[u8]) -> Result<(), ()> {
        self.core
            .gdb_deserialize(bytes.get(..CORE_BYTES).ok_or(())?)?;
        for (i, chunk) in bytes
            .get(CORE_BYTES..)
            .unwrap_or(&[])
            .chunks_exact(8)
            .take(9)
            .enumerate()
        {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            self.sys[i] = u64::from_le_bytes(b);
        }
        Ok(())
    }
}

impl gdbstub::arch::Arch for X86_64System {
    type Usize = u64;
    type Registers = SystemRegs;
    type RegId = gdbstub_arch::x86::reg::id::X86_64CoreRegId;
    type BreakpointKind = usize;

    fn target_description_xml() -> Option<&'static str> {
        Some(TARGET_XML)
    }
}

/// The target description: gdb's i386 64-bit core and SSE features, the
/// segment-base feature and a system-register feature, registers in the
/// order of the `g` packet.
const TARGET_XML: &str = r#"<?xml version="1.0"?>
<!DOCTYPE target SYSTEM "gdb-target.dtd">
<target version="1.0">
<architecture>i386:x86-64</architecture>
<feature name="org.gnu.gdb.i386.core">
<flags id="i386_eflags" size="4">
<field name="CF" start="0" end="0"/><field name="" start="1" end="1"/>
<field name="PF" start="2" end="2"/><field name="AF" start="4" end="4"/>
<field name="ZF" start="6" end="6"/><field name="SF" start="7" end="7"/>
<field name="TF" start="8" end="8"/><field name="IF" start="9" end="9"/>
<field name="DF" start="10" end="10"/><field name="OF" start="11" end="11"/>
<field name="NT" start="14" end="14"/><field name="RF" start="16" end="16"/>
<field name="VM" start="17" end="17"/><field name="AC" start="18" end="18"/>
<field name="VIF" start="19" end="19"/><field name="VIP" start="20" end="20"/>
<field name="ID" start="21" end="21"/>
</flags>
<reg name="rax" bitsize="64" type="int64" regnum="0"/>
<reg name="rbx" bitsize="64" type="int64"/>
<reg name="rcx" bitsize="64" type="int64"/>
<reg name="rdx" bitsize="64" type="int64"/>
<reg name="rsi" bitsize="64" type="int64"/>
<reg name="rdi" bitsize="64" type="int64"/>
<reg name="rbp" bitsize="64" type="data_ptr"/>
<reg name="rsp" bitsize="64" type="data_ptr"/>
<reg name="r8" bitsize="64" type="int64"/>
<reg name="r9" bitsize="64" type="int64"/>
<reg name="r10" bitsize="64" type="int64"/>
<reg name="r11" bitsize="64" type="int64"/>
<reg name="r12" bitsize="64" type="int64"/>
<reg name="r13" bitsize="64" type="int64"/>
<reg name="r14" bitsize="64" type="int64"/>
<reg name="r15" bitsize="64" type="int64"/>
<reg name="rip" bitsize="64" type="code_ptr"/>
<reg name="eflags" bitsize="32" type="i386_eflags"/>
<reg name="cs" bitsize="32" type="int32"/>
<reg name="ss" bitsize="32" type="int32"/>
<reg name="ds" bitsize="32" type="int32"/>
<reg name="es" bitsize="32" type="int32"/>
<reg name="fs" bitsize="32" type="int32"/>
<reg name="gs" bitsize="32" type="int32"/>
<reg name="st0" bitsize="80" type="i387_ext"/>
<reg name="st1" bitsize="80" type="i387_ext"/>
<reg name="st2" bitsize="80" type="i387_ext"/>
<reg name="st3" bitsize="80" type="i387_ext"/>
<reg name="st4" bitsize="80" type="i387_ext"/>
<reg name="st5" bitsize="80" type="i387_ext"/>
<reg name="st6" bitsize="80" type="i387_ext"/>
<reg name="st7" bitsize="80" type="i387_ext"/>
<reg name="fctrl" bitsize="32" type="int" group="float"/>
<reg name="fstat" bitsize="32" type="int" group="float"/>
<reg name="ftag" bitsize="32" type="int" group="float"/>
<reg name="fiseg" bitsize="32" type="int" group="float"/>
<reg name="fioff" bitsize="32" type="int" group="float"/>
<reg name="foseg" bitsize="32" type="int" group="float"/>
<reg name="fooff" bitsize="32" type="int" group="float"/>
<reg name="fop" bitsize="32" type="int" group="float"/>
</feature>
<feature name="org.gnu.gdb.i386.sse">
<vector id="v4f" type="ieee_single" count="4"/>
<vector id="v2d" type="ieee_double" count="2"/>
<vector id="v16i8" type="int8" count="16"/>
<vector id="v8i16" type="int16" count="8"/>
<vector id="v4i32" type="int32" count="4"/>
<vector id="v2i64" type="int64" count="2"/>
<union id="vec128">
<field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>
<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>
<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>
<field name="uint128" type="uint128"/>
</union>
<flags id="i386_mxcsr" size="4">
<field name="IE" start="0" end="0"/><field name="DE" start="1" end="1"/>
<field name="ZE" start="2" end="2"/><field name="OE" start="3" end="3"/>
<field name="UE" start="4" end="4"/><field name="PE" start="5" end="5"/>
<field name="DAZ" start="6" end="6"/><field name="IM" start="7" end="7"/>
<field name="DM" start="8" end="8"/><field name="ZM" start="9" end="9"/>
<field name="OM" start="10" end="10"/><field name="UM" start="11" end="11"/>
<field name="PM" start="12" end="12"/><field name="FZ" start="15" end="15"/>
</flags>
<reg name="xmm0" bitsize="128" type="vec128" regnum="40"/>
<reg name="xmm1" bitsize="128" type="vec128"/>
<reg name="xmm2" bitsize="128" type="vec128"/>
<reg name="xmm3" bitsize="128" type="vec128"/>
<reg name="xmm4" bitsize="128" type="vec128"/>
<reg name="xmm5" bitsize="128" type="vec128"/>
<reg name="xmm6" bitsize="128" type="vec128"/>
<reg name="xmm7" bitsize="128" type="vec128"/>
<reg name="xmm8" bitsize="128" type="vec128"/>
<reg name="xmm9" bitsize="128" type="vec128"/>
<reg name="xmm10" bitsize="128" type="vec128"/>
<reg name="xmm11" bitsize="128" type="vec128"/>
<reg name="xmm12" bitsize="128" type="vec128"/>
<reg name="xmm13" bitsize="128" type="vec128"/>
<reg name="xmm14" bitsize="128" type="vec128"/>
<reg name="xmm15" bitsize="128" type="vec128"/>
<reg name="mxcsr" bitsize="32" type="i386_mxcsr" group="vector"/>
</feature>
<feature name="org.gnu.gdb.i386.segments">
<reg name="fs_base" bitsize="64" type="int"/>
<reg name="gs_base" bitsize="64" type="int"/>
</feature>
<feature name="org.tandem.x86.system">
<reg name="k_gs_base" bitsize="64" type="int" group="system"/>
<reg name="cr0" bitsize="64" type="int" group="system"/>
<reg name="cr2" bitsize="64" type="int" group="system"/>
<reg name="cr3" bitsize="64" type="int" group="system"/>
<reg name="cr4" bitsize="64" type="int" group="system"/>
<reg name="cr8" bitsize="64" type="int" group="system"/>
<reg name="efer" bitsize="64" type="int" group="system"/>
</feature>
</target>"#;

/// The session as gdb's target.
struct GdbTarget<'a> {
    s: &'a mut Session,
    resume: Option<Resume>,
}

fn err(e: anyhow::Error) -> String {
    format!("{e:#}")
}

impl Target for GdbTarget<'_> {
    type Arch = X86_64System;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::SingleThread(self)
    }
    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }
    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        // Software breakpoints are the engine's, not INT3 in memory.
        true
    }
}

impl SingleThreadBase for GdbTarget<'_> {
    fn read_registers(&mut self, regs: &mut SystemRegs) -> TargetResult<(), Self> {
        let r = self.s.regs().map_err(|e| TargetError::Fatal(err(e)))?;
        let s = self.s.sregs().map_err(|e| TargetError::Fatal(err(e)))?;
        let fpu = self
            .s
            .vcpu()
            .get_fpu()
            .map_err(|e| TargetError::Fatal(e.to_string()))?;
        let msrs = self
            .s
            .vcpu()
            .get_msrs(&[0xc000_0102])
            .map_err(|e| TargetError::Fatal(e.to_string()))?;
        let c = &mut regs.core;
        c.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        c.rip = r.rip;
        c.eflags = r.rflags as u32;
        c.segments.cs = u32::from(s.cs.selector);
        c.segments.ss = u32::from(s.ss.selector);
        c.segments.ds = u32::from(s.ds.selector);
        c.segments.es = u32::from(s.es.selector);
        c.segments.fs = u32::from(s.fs.selector);
        c.segments.gs = u32::from(s.gs.selector);
        fill_fpu(c, &fpu);
        let kgs = msrs.first().map_or(0, |m| m.value);
        regs.sys = [
            s.fs.base, s.gs.base, kgs, s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer,
        ];
        Ok(())
    }

    fn write_registers(&mut self, regs: &SystemRegs) -> TargetResult<(), Self> {
        let mut r = self.s.regs().map_err(|e| TargetError::Fatal(err(e)))?;
        let c = &regs.core;
        let g = c.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = c.rip;
        r.rflags = (r.rflags & !0xffff_ffff) | u64::from(c.eflags);
        self.s
            .vcpu()
            .set_regs(&r)
            .map_err(|e| TargetError::Fatal(e.to_string()))?;
        // Segment and system registers are read-only here: writing a
        // selector without its descriptor cache would be half a load.
        Ok(())
    }

    fn read_addrs(&mut self, start_addr: u64, data: &mut [u8]) -> TargetResult<usize, Self> {
        let n = self
            .s
            .read_linear(start_addr, data)
            .map_err(|e| TargetError::Fatal(err(e)))?;
        if n == 0 && !data.is_empty() {
            return Err(TargetError::NonFatal);
        }
        Ok(n)
    }

    fn write_addrs(&mut self, start_addr: u64, data: &[u8]) -> TargetResult<(), Self> {
        let n = self
            .s
            .write_linear(start_addr, data)
            .map_err(|e| TargetError::Fatal(err(e)))?;
        if n < data.len() {
            return Err(TargetError::NonFatal);
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<SingleThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

/// x87 and SSE registers from the FXSAVE image.
fn fill_fpu(c: &mut X86_64CoreRegs, fpu: &tandem_core::cpu::FpuState) {
    let img = fpu_image(fpu);
    let u16at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]);
    let u32at = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]);
    c.fpu.fctrl = u32::from(u16at(0));
    c.fpu.fstat = u32::from(u16at(2));
    c.fpu.ftag = u32::from(img[4]);
    c.fpu.fop = u32::from(u16at(6));
    c.fpu.fioff = u32at(8);
    c.fpu.fiseg = u32::from(u16at(12));
    c.fpu.fooff = u32at(16);
    c.fpu.foseg = u32::from(u16at(20));
    c.mxcsr = u32at(24);
    for i in 0..8 {
        let mut st = [0u8; 10];
        st.copy_from_slice(&img[32 + 16 * i..42 + 16 * i]);
        c.st[i] = st;
    }
    for i in 0..16 {
        let mut x = [0u8; 16];
        x.copy_from_slice(&img[160 + 16 * i..176 + 16 * i]);
        c.xmm[i] = u128::from_le_bytes(x);
    }
}

/// The 512-byte FXSAVE layout of the FPU state (zeros where absent).
fn fpu_image(fpu: &tandem_core::cpu::FpuState) -> [u8; 512] {
    let mut img = [0u8; 512];
    let src = &fpu.xsave;
    let n = src.len().min(512);
    img[..n].copy_from_slice(&src[..n]);
    img
}

impl SingleThreadResume for GdbTarget<'_> {
    fn resume(&mut self, _signal: Option<Signal>) -> Result<(), String> {
        self.resume = Some(Resume::Continue);
        Ok(())
    }
    fn support_single_step(&mut self) -> Option<SingleThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl SingleThreadSingleStep for GdbTarget<'_> {
    fn step(&mut self, _signal: Option<Signal>) -> Result<(), String> {
        self.resume = Some(Resume::Step);
        Ok(())
    }
}

impl Breakpoints for GdbTarget<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
}

impl GdbTarget<'_> {
    fn add(&mut self, addr: u64) -> TargetResult<bool, Self> {
        if self
            .s
            .breakpoints()
            .iter()
            .any(|b| b.kind == BpKind::Addr(addr) && !b.temporary)
        {
            return Ok(true);
        }
        match self.s.add_breakpoint(BpKind::Addr(addr), false) {
            Ok(_) => Ok(true),
            Err(e) => {
                eprintln!("tandem: gdb breakpoint at {addr:#x} refused: {e:#}");
                Ok(false)
            }
        }
    }
}

impl SwBreakpoint for GdbTarget<'_> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.add(addr)
    }
    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.s.delete_addr_breakpoint(addr))
    }
}

impl HwBreakpoint for GdbTarget<'_> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.add(addr)
    }
    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.s.delete_addr_breakpoint(addr))
    }
}

impl MonitorCmd for GdbTarget<'_> {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), String> {
        let cmd = String::from_utf8_lossy(cmd).to_string();
        let first = cmd.split_whitespace().next().unwrap_or("");
        if matches!(
            first,
            "s" | "step" | "si" | "stepi" | "n" | "next" | "c" | "continue" | "until" | "u"
        ) {
            outputln!(
                out,
                "use gdb's own stepi / continue; monitor runs the other commands"
            );
            return Ok(());
        }
        let mut text = String::new();
        match execute(self.s, &cmd, &mut text) {
            Ok(Flow::Go) | Ok(Flow::Quit) => {}
            Err(e) => text.push_str(&format!("error: {e:#}\n")),
        }
        for l in text.lines() {
            outputln!(out, "{l}");
        }
        Ok(())
    }
}

/// Watches the connection for gdb's interrupt (0x03) while the guest runs:
/// it stops the engine without consuming the byte.
struct InterruptWatch {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InterruptWatch {
    fn start(conn: &TcpStream, s: &Session) -> Option<InterruptWatch> {
        let peer = conn.try_clone().ok()?;
        let flag = s.interrupt.clone();
        let bell = s.pc.machine.doorbells.first().cloned();
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let _ = peer.set_read_timeout(Some(std::time::Duration::from_millis(20)));
        let thread = std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while !d.load(Ordering::SeqCst) {
                match peer.peek(&mut b) {
                    Ok(0) | Ok(1..) => {
                        flag.store(true, Ordering::SeqCst);
                        if let Some(bell) = &bell {
                            bell.ring();
                        }
                        break;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = peer.set_read_timeout(None);
        });
        Some(InterruptWatch {
            done,
            thread: Some(thread),
        })
    }
}

impl Drop for InterruptWatch {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum EventLoop<'a> {
    #[allow(dead_code)]
    Marker(&'a ()),
}

impl<'a> run_blocking::BlockingEventLoop for EventLoop<'a> {
    type Target = GdbTarget<'a>;
    type Connection = TcpStream;
    type StopReason = SingleThreadStopReason<u64>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut GdbTarget<'a>,
        conn: &mut TcpStream,
    ) -> Result<
        run_blocking::Event<Self::StopReason>,
        run_blocking::WaitForStopReasonError<String, std::io::Error>,
    > {
        let mode = target.resume.take().unwrap_or(Resume::Continue);
        let stop = {
            let _watch = InterruptWatch::start(conn, target.s);
            target.s.resume(mode)
        };
        let stop = stop.map_err(|e| run_blocking::WaitForStopReasonError::Target(err(e)))?;
        let reason = match stop {
            Stop::Step => SingleThreadStopReason::DoneStep,
            Stop::Breakpoint { .. } => SingleThreadStopReason::SwBreak(()),
            Stop::Delivered { .. } | Stop::IrqRaised { .. } | Stop::Eoi { .. } => {
                for n in &target.s.notes {
                    eprintln!("tandem: {n}");
                }
                SingleThreadStopReason::Signal(Signal::SIGTRAP)
            }
            Stop::Finished(o) => {
                SingleThreadStopReason::Exited(o.exit_status().clamp(0, 255) as u8)
            }
            Stop::Interrupted => {
                // The byte that stopped the guest is gdb's; hand it over.
                let mut b = [0u8; 1];
                match std::io::Read::read(conn, &mut b) {
                    Ok(1) => return Ok(run_blocking::Event::IncomingData(b[0])),
                    _ => SingleThreadStopReason::Signal(Signal::SIGINT),
                }
            }
        };
        Ok(run_blocking::Event::TargetStopped(reason))
    }

    fn on_interrupt(
        _target: &mut GdbTarget<'a>,
    ) -> Result<Option<SingleThreadStopReason<u64>>, String> {
        Ok(Some(SingleThreadStopReason::Signal(Signal::SIGINT)))
    }
}

/// Waits for gdb on `addr`, serves it, and when it detaches runs the guest
/// to its end. Returns the guest's process status.
pub fn serve(s: &mut Session, addr: &str) -> Result<i32> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("cannot listen for gdb on {addr}"))?;
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    eprintln!(
        "tandem: waiting for gdb on {local} ({}): gdb -ex 'target remote {local}'",
        s.backend_name()
    );
    let (conn, _) = listener
        .accept()
        .context("cannot accept gdb's connection")?;
    let _ = conn.set_nodelay(true);
    drop(listener);
    let stub = GdbStub::new(conn);
    let mut target = GdbTarget {
        s: &mut *s,
        resume: None,
    };
    let reason = stub.run_blocking::<EventLoop<'_>>(&mut target);
    match reason {
        Ok(DisconnectReason::TargetExited(code)) => return Ok(i32::from(code)),
        Ok(DisconnectReason::Kill) => return Ok(0),
        Ok(_) => {}
        Err(e) => eprintln!("tandem: gdb session ended: {e}"),
    }
    // gdb detached: the guest runs on to its end.
    s.delete_breakpoint(None);
    loop {
        match s.resume(Resume::Continue)? {
            Stop::Finished(o) => return Ok(o.exit_status()),
            Stop::Interrupted => continue,
            _ => continue,
        }
    }
}
