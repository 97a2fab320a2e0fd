//! The coordinator: starts the worker processes, starts their window together, prints the
//! live status line, samples the gateway process, runs the restart command of a storm, and
//! merges the workers' results into one report.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

use crate::cli::Output;
use crate::gateway::{sample_proc, GatewaySeen, ProcSample};
use crate::plan::Plan;
use crate::report::{self, Point, Restart};
use crate::stats::{Counters, Lat, Tick, WorkerResult, C};
use crate::util::mono_ns;

const SEC: u64 = 1_000_000_000;
/// Sockets one worker may hold (the open-files limit here is 20,000).
pub const MAX_PER_PROC: u32 = 19_000;

/// What a worker said on its stdout.
enum Line {
    Ready,
    Tick(Box<Tick>),
    Result(Box<WorkerResult>),
    Gone,
}

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    ready: bool,
    last: Option<Tick>,
    result: Option<WorkerResult>,
}

fn spawn(plan: &Plan, index: u32, tx: &mpsc::Sender<(usize, Line)>) -> anyhow::Result<Worker> {
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let mut child = Command::new(exe)
        .arg("__worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start a worker process")?;
    let mut stdin = child.stdin.take().context("worker stdin")?;
    let mut mine = plan.clone();
    mine.proc_index = index;
    writeln!(stdin, "{}", serde_json::to_string(&mine)?)?;
    stdin.flush()?;
    let stdout = child.stdout.take().context("worker stdout")?;
    let tx = tx.clone();
    let idx = index as usize;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let parsed = if line == "ready" {
                Line::Ready
            } else if let Some(j) = line.strip_prefix("tick ") {
                match serde_json::from_str(j) {
                    Ok(t) => Line::Tick(Box::new(t)),
                    Err(_) => continue,
                }
            } else if let Some(j) = line.strip_prefix("result ") {
                match serde_json::from_str(j) {
                    Ok(r) => Line::Result(Box::new(r)),
                    Err(_) => continue,
                }
            } else {
                continue;
            };
            if tx.send((idx, parsed)).is_err() {
                return;
            }
        }
        let _ = tx.send((idx, Line::Gone));
    });
    Ok(Worker {
        child,
        stdin: Some(stdin),
        ready: false,
        last: None,
        result: None,
    })
}

/// Sums of the workers' latest ticks.
#[derive(Default)]
struct Agg {
    ready: u64,
    target: u64,
    counters: Counters,
    errors: u64,
}

fn aggregate(workers: &[Worker]) -> Agg {
    let mut a = Agg::default();
    for t in workers.iter().filter_map(|w| w.last.as_ref()) {
        a.ready += t.ready;
        a.target += t.target;
        a.counters.merge(&t.counters);
        a.errors += t.errors;
    }
    a
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

fn send_all(workers: &mut [Worker], line: &str) {
    for w in workers.iter_mut() {
        if let Some(stdin) = w.stdin.as_mut() {
            let _ = writeln!(stdin, "{line}").and_then(|()| stdin.flush());
        }
    }
}

/// Runs the plan with `plan.procs` workers and writes the reports.
pub fn run(plan: Plan, output: Output) -> anyhow::Result<()> {
    let per_proc = (0..plan.procs)
        .map(|i| {
            let mut p = plan.clone();
            p.proc_index = i;
            p.connections_here()
        })
        .max()
        .unwrap_or(0);
    let limit = crate::net::raise_nofile();
    let allowed = MAX_PER_PROC.min(limit.saturating_sub(200) as u32);
    if per_proc > allowed {
        bail!(
            "{per_proc} connections per worker process is over {allowed} (open-files limit {limit}): \
             use --procs {}",
            (u64::from(per_proc) * u64::from(plan.procs)).div_ceil(u64::from(allowed.max(1)))
        );
    }
    let mut gw = output.gateway_pid.map(|pid| GatewaySeen {
        pid,
        before: sample_proc(pid),
        ..GatewaySeen::default()
    });
    if let Some(g) = &gw {
        if g.before.is_none() {
            bail!("--gateway-pid {}: no such process readable in /proc", g.pid);
        }
    }
    let (tx, rx) = mpsc::channel();
    let mut workers = Vec::new();
    for i in 0..plan.procs {
        workers.push(spawn(&plan, i, &tx)?);
    }
    drop(tx);
    let started = mono_ns();
    let started_wall = crate::util::unix_ms();
    let overall =
        started + (plan.setup_timeout_ms + plan.duration_ms + plan.drain_ms + 30_000) * 1_000_000;
    let (mut t0, mut t1, mut storm_t) = (0u64, 0u64, 0u64);
    let mut t1_sampled = false;
    let mut restart: Option<(Instant, mpsc::Receiver<Restart>)> = None;
    let mut restart_seen = None;
    let mut timeline: Vec<Point> = Vec::new();
    let mut interval = Lat::default();
    let mut prev: Option<(u64, Agg)> = None;
    let mut next_status = started + SEC;
    let mut gw_prev: Option<ProcSample> = gw.as_ref().and_then(|g| g.before);
    let mut stopping = false;
    loop {
        if workers.iter().all(|w| w.result.is_some()) {
            break;
        }
        let now = mono_ns();
        let mut wake = next_status;
        for t in [t0, t1, storm_t] {
            if t > now {
                wake = wake.min(t);
            }
        }
        let wait = Duration::from_nanos(wake.saturating_sub(now).max(1_000_000));
        match rx.recv_timeout(wait) {
            Ok((i, Line::Ready)) => {
                workers[i].ready = true;
                if t0 == 0 && workers.iter().all(|w| w.ready) {
                    t0 = mono_ns() + 100_000_000;
                    t1 = t0 + plan.duration_ms * 1_000_000;
                    storm_t = plan
                        .storm
                        .as_ref()
                        .map_or(0, |s| t0 + s.after_ms * 1_000_000);
                    send_all(&mut workers, &format!("go {t0} {t1} {storm_t}"));
                }
            }
            Ok((i, Line::Tick(t))) => {
                for (v, c) in t.interval.0.iter().map(|p| (p[0], p[1])) {
                    let _ = interval.0.record_n(v, c);
                }
                workers[i].last = Some(*t);
            }
            Ok((i, Line::Result(r))) => workers[i].result = Some(*r),
            Ok((i, Line::Gone)) => {
                if workers[i].result.is_none() {
                    send_all(&mut workers, "stop");
                    for w in &mut workers {
                        let _ = w.child.kill();
                        let _ = w.child.wait();
                    }
                    bail!("worker process {i} ended without a result");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        let now = mono_ns();
        if storm_t != 0 && now >= storm_t && restart.is_none() {
            if let Some(cmd) = output.restart_cmd.clone() {
                let (rtx, rrx) = mpsc::channel();
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let status = Command::new("sh").arg("-c").arg(&cmd).status();
                    let _ = rtx.send(Restart {
                        command: cmd,
                        exit_code: status.as_ref().ok().and_then(|s| s.code()),
                        error: status.err().map(|e| e.to_string()),
                        seconds: started.elapsed().as_secs_f64(),
                    });
                });
                restart = Some((Instant::now(), rrx));
            }
        }
        if let Some((_, rrx)) = &restart {
            if let Ok(r) = rrx.try_recv() {
                restart_seen = Some(r);
            }
        }
        if let Some(g) = gw.as_mut() {
            if t0 != 0 && now >= t0 && g.at_t0.is_none() {
                g.at_t0 = sample_proc(g.pid);
            }
            if t1 != 0 && now >= t1 && !t1_sampled {
                t1_sampled = true;
                g.at_t1 = sample_proc(g.pid);
            }
        }
        if now >= next_status {
            next_status += SEC;
            let agg = aggregate(&workers);
            let gs = gw.as_ref().and_then(|g| sample_proc(g.pid));
            if let (Some(g), Some(s)) = (gw.as_mut(), gs) {
                g.peak_rss = g.peak_rss.max(s.rss_bytes);
            }
            let point = status_point(
                now,
                started,
                &agg,
                prev.as_ref(),
                &interval,
                gs,
                gw_prev,
                t0,
                t1,
            );
            gw_prev = gs.or(gw_prev);
            if !output.quiet {
                eprintln!("{}", status_line(plan.scenario.name(), &point));
            }
            timeline.push(point);
            interval.0.reset();
            prev = Some((now, agg));
        }
        if now >= overall && !stopping {
            stopping = true;
            eprintln!("arcgate-load: the run overran its time; stopping the workers");
            send_all(&mut workers, "stop");
        }
    }
    for w in &mut workers {
        w.stdin = None;
        let _ = w.child.wait();
    }
    if let Some((_, rrx)) = restart.take() {
        if restart_seen.is_none() {
            restart_seen = rrx.recv_timeout(Duration::from_secs(30)).ok();
        }
    }
    let results: Vec<WorkerResult> = workers.into_iter().filter_map(|w| w.result).collect();
    if results.is_empty() {
        return Err(anyhow!("no worker produced a result"));
    }
    let rep = report::build(
        &plan,
        &results,
        gw.as_ref(),
        timeline,
        restart_seen,
        started_wall,
    );
    print!("{}", report::table(&rep));
    if let Some(path) = &output.json {
        std::fs::write(path, serde_json::to_string_pretty(&rep)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &output.html {
        std::fs::write(path, report::html(&rep))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn status_point(
    now: u64,
    started: u64,
    agg: &Agg,
    prev: Option<&(u64, Agg)>,
    interval: &Lat,
    gw: Option<ProcSample>,
    gw_prev: Option<ProcSample>,
    t0: u64,
    t1: u64,
) -> Point {
    let (dt, out, inn, del, err) = match prev {
        Some((at, p)) => {
            let dt = (now - at) as f64 / SEC as f64;
            let d = agg.counters.since(&p.counters);
            (
                dt,
                d.get(C::MsgsOut),
                d.get(C::MsgsIn),
                d.get(C::Deliveries),
                agg.errors.saturating_sub(p.errors),
            )
        }
        None => (
            (now - started) as f64 / SEC as f64,
            agg.counters.get(C::MsgsOut),
            agg.counters.get(C::MsgsIn),
            agg.counters.get(C::Deliveries),
            agg.errors,
        ),
    };
    let dt = dt.max(1e-3);
    let phase = if t0 == 0 || now < t0 {
        "setup"
    } else if now < t1 {
        "window"
    } else {
        "drain"
    };
    let gw_cpu = match (gw, gw_prev) {
        (Some(a), Some(b)) => Some(a.cpu_ns.saturating_sub(b.cpu_ns) as f64 / (dt * SEC as f64)),
        _ => None,
    };
    Point {
        t: (now - started) as f64 / SEC as f64,
        phase: phase.into(),
        connections: agg.ready,
        target: agg.target,
        out_per_s: out as f64 / dt,
        in_per_s: inn as f64 / dt,
        deliveries_per_s: del as f64 / dt,
        errors: err,
        p99: (!interval.0.is_empty()).then(|| interval.ms_at(99.0)),
        gateway_cpu: gw_cpu,
        gateway_rss: gw.map(|s| s.rss_bytes),
    }
}

fn status_line(scenario: &str, p: &Point) -> String {
    let p99 = p.p99.map_or("-".to_string(), |v| format!("{v:.2}ms"));
    let mut line = format!(
        "[{:>5.0}s {:<6}] {scenario} conns {}/{} | out {}/s | in {}/s | errors {} | p99 {p99}",
        p.t,
        p.phase,
        p.connections,
        p.target,
        human(p.out_per_s),
        human(p.in_per_s),
        p.errors,
    );
    if let Some(cpu) = p.gateway_cpu {
        line.push_str(&format!(" | gateway cpu {:.0}%", cpu * 100.0));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_shows_the_essentials() {
        let p = Point {
            t: 3.0,
            phase: "window".into(),
            connections: 10,
            target: 12,
            out_per_s: 12_345.0,
            in_per_s: 5.0,
            deliveries_per_s: 0.0,
            errors: 2,
            p99: Some(1.5),
            gateway_cpu: Some(0.5),
            gateway_rss: None,
        };
        let l = status_line("fanout", &p);
        for part in [
            "conns 10/12",
            "out 12.3k/s",
            "in 5/s",
            "errors 2",
            "p99 1.50ms",
            "cpu 50%",
        ] {
            assert!(l.contains(part), "{l}");
        }
    }
}
