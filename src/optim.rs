//! Optimizers on tch tensors whose state is visible (feature `tch`): SGD (momentum, nesterov,
//! weight decay), Adam and AdamW (amsgrad, decoupled weight decay), computing what
//! `torch.optim`'s single-tensor code computes, step for step, with `state_dict()` in PyTorch's
//! layout, so an optimizer state saved by PyTorch loads here and the reverse.
//!
//! tch's own `nn::Optimizer` hides its state, so training cannot resume exactly from it.
//!
//! ```no_run
//! use ckptio::optim::{Adam, Optimizer};
//! use tch::{nn, nn::Module, Device, Kind, Tensor};
//! # fn main() -> ckptio::Result<()> {
//! let vs = nn::VarStore::new(Device::Cpu);
//! let lin = nn::linear(vs.root(), 4, 2, Default::default());
//! let mut opt = Adam::adamw(vs.trainable_variables(), 1e-3, 0.01);
//! let loss = lin.forward(&Tensor::ones([8, 4], (Kind::Float, Device::Cpu))).sum(Kind::Float);
//! opt.zero_grad();
//! loss.backward();
//! opt.step()?;
//! let state = opt.state_dict()?; // {"state": {0: {"step", "exp_avg", "exp_avg_sq"}, ...}, "param_groups": [...]}
//! # Ok(()) }
//! ```

use tch::Tensor;

use crate::error::{Error, Result};
use crate::tch::{to_host, to_tch};
use crate::tensor::HostTensor;
use crate::value::{Dict, Key, Value};

/// What every optimizer here offers.
pub trait Optimizer {
    /// One step, with each parameter's `.grad()` (parameters without a gradient are skipped).
    fn step(&mut self) -> Result<()> {
        let grads: Vec<Option<Tensor>> = self
            .params()
            .iter()
            .map(|p| {
                let g = p.grad();
                g.defined().then_some(g)
            })
            .collect();
        self.step_with(&grads)
    }
    /// One step with the given gradients (one per parameter; `None` skips it).
    fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<()>;
    /// The parameters, in order (their index is their id in the state dict).
    fn params(&self) -> &[Tensor];
    /// Zeroes every gradient.
    fn zero_grad(&mut self) {
        for p in self.params() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }
    /// The state in PyTorch's layout.
    fn state_dict(&self) -> Result<Value>;
    /// Restores the state from PyTorch's layout (one parameter group).
    fn load_state_dict(&mut self, sd: &Value) -> Result<()>;
    /// The state parameter `i` has before its first step, in the layout of
    /// [`state_dict`](Optimizer::state_dict), when loading it restores a fresh optimizer
    /// (as PyTorch's `_init_optim_state` makes one); `None` (the default) when the optimizer
    /// keeps no state for it. [`ShardedOptimizer`] uses it so that a fresh optimizer's state
    /// names every part a load must fill.
    fn initial_state(&self, _i: usize) -> Result<Option<Value>> {
        Ok(None)
    }
}

/// An optimizer state dict that does not fit this optimizer (an [`Error::State`]).
fn bad(msg: impl Into<String>) -> Error {
    Error::state(msg)
}

fn check_grads(grads: &[Option<Tensor>], n: usize) -> Result<()> {
    if grads.len() != n {
        return Err(Error::Argument {
            name: "grads",
            reason: format!("{} gradients for {n} parameters", grads.len()),
        });
    }
    Ok(())
}

fn float(d: &Dict, k: &str) -> Result<f64> {
    d.get(k)
        .and_then(Value::as_float)
        .ok_or_else(|| bad(format!("param group has no number {k:?}")))
}

fn boolean(d: &Dict, k: &str) -> Result<bool> {
    match d.get(k) {
        Some(Value::Bool(b)) => Ok(*b),
        None => Ok(false),
        Some(other) => Err(bad(format!(
            "param group {k:?} is a {}, expected bool",
            other.type_name()
        ))),
    }
}

/// The single param group and the per-parameter state of a PyTorch optimizer state dict.
fn split(sd: &Value, n: usize) -> Result<(&Dict, &Dict)> {
    let sd = sd
        .as_dict()
        .ok_or_else(|| bad("optimizer state dict must be a dict"))?;
    let state = sd
        .get("state")
        .and_then(Value::as_dict)
        .ok_or_else(|| bad("no \"state\" dict"))?;
    let groups = sd
        .get("param_groups")
        .and_then(Value::as_seq)
        .ok_or_else(|| bad("no \"param_groups\" list"))?;
    let [group] = groups else {
        return Err(bad(format!(
            "{} param groups; ckptio's optimizers hold one",
            groups.len()
        )));
    };
    let group = group
        .as_dict()
        .ok_or_else(|| bad("param group must be a dict"))?;
    let ids = group
        .get("params")
        .and_then(Value::as_seq)
        .ok_or_else(|| bad("param group has no params"))?;
    if ids.len() != n {
        return Err(bad(format!(
            "state dict has {} params, optimizer has {n}",
            ids.len()
        )));
    }
    if let Some(k) = state.keys().find(|k| param_index(k).is_none_or(|i| i >= n)) {
        return Err(bad(format!(
            "state of {k}, which is not a parameter index below {n}"
        )));
    }
    Ok((group, state))
}

/// The parameter index a state key names: an int, or its decimal string (DCP's flattening
/// turns every dict key into a string, as PyTorch's does, so a sharded checkpoint gives `"0"`
/// for `0`).
fn param_index(k: &Key) -> Option<usize> {
    match k {
        Key::Int(i) => usize::try_from(*i).ok(),
        Key::Str(s) => s.parse().ok().filter(|i: &usize| i.to_string() == *s),
        _ => None,
    }
}

/// The state of parameter `i`, under its int key or its string form.
fn param_state(state: &Dict, i: usize) -> Option<&Dict> {
    state
        .get(&Key::Int(i as i64))
        .or_else(|| state.get(i.to_string().as_str()))
        .and_then(Value::as_dict)
}

fn group_params(n: usize) -> Value {
    Value::List((0..n as i64).map(Value::Int).collect())
}

fn state_tensor(s: &Dict, k: &str, like: &Tensor) -> Result<Option<Tensor>> {
    match s.get(k) {
        Some(Value::Tensor(t)) => {
            let want: Vec<usize> = like.size().iter().map(|&d| d as usize).collect();
            if t.shape() != want.as_slice() {
                return Err(bad(format!(
                    "{k}: shape {:?}, parameter is {:?}",
                    t.shape(),
                    want
                )));
            }
            Ok(Some(to_tch(t, like.device())?.to_kind(like.kind())))
        }
        Some(Value::None) | None => Ok(None),
        Some(other) => Err(bad(format!(
            "{k} is a {}, expected a tensor",
            other.type_name()
        ))),
    }
}

fn host(t: &Tensor) -> Result<Value> {
    Ok(Value::Tensor(to_host(t)?))
}

/// `torch.optim.SGD`.
pub struct Sgd {
    params: Vec<Tensor>,
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor.
    pub momentum: f64,
    /// Dampening for momentum.
    pub dampening: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    buffers: Vec<Option<Tensor>>,
}

impl Sgd {
    /// SGD over `params` (no momentum, no weight decay).
    pub fn new(params: Vec<Tensor>, lr: f64) -> Sgd {
        let n = params.len();
        Sgd {
            params,
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            buffers: (0..n).map(|_| None).collect(),
        }
    }
    /// Sets momentum (and nesterov).
    pub fn momentum(mut self, momentum: f64, nesterov: bool) -> Sgd {
        self.momentum = momentum;
        self.nesterov = nesterov;
        self
    }
    /// Sets the dampening.
    pub fn dampening(mut self, dampening: f64) -> Sgd {
        self.dampening = dampening;
        self
    }
    /// Sets the weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Sgd {
        self.weight_decay = wd;
        self
    }
}

impl Optimizer for Sgd {
    fn params(&self) -> &[Tensor] {
        &self.params
    }

    fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        check_grads(grads, self.params.len())?;
        tch::no_grad(|| {
            for (i, g) in grads.iter().enumerate() {
                let Some(g) = g else { continue };
                let p = &mut self.params[i];
                let mut d = if self.weight_decay != 0.0 {
                    g + &*p * self.weight_decay
                } else {
                    g.shallow_clone()
                };
                if self.momentum != 0.0 {
                    let buf = match self.buffers[i].take() {
                        None => d.detach().copy(),
                        Some(mut b) => {
                            let _ = b.g_mul_scalar_(self.momentum);
                            let _ = b.g_add_(&(&d * (1.0 - self.dampening)));
                            b
                        }
                    };
                    d = if self.nesterov {
                        &d + &buf * self.momentum
                    } else {
                        buf.shallow_clone()
                    };
                    self.buffers[i] = Some(buf);
                }
                let _ = p.g_add_(&(&d * -self.lr));
            }
        });
        Ok(())
    }

    fn state_dict(&self) -> Result<Value> {
        let mut state = Dict::new();
        for (i, b) in self.buffers.iter().enumerate() {
            if let Some(b) = b {
                let mut s = Dict::new();
                s.insert("momentum_buffer", host(b)?);
                state.insert(i as i64, s);
            }
        }
        let mut g = Dict::new();
        g.insert("lr", self.lr);
        g.insert("momentum", self.momentum);
        g.insert("dampening", self.dampening);
        g.insert("weight_decay", self.weight_decay);
        g.insert("nesterov", self.nesterov);
        g.insert("maximize", false);
        g.insert("foreach", ());
        g.insert("differentiable", false);
        g.insert("fused", ());
        g.insert("params", group_params(self.params.len()));
        let mut sd = Dict::new();
        sd.insert("state", state);
        sd.insert("param_groups", Value::List(vec![Value::Dict(g)]));
        Ok(Value::Dict(sd))
    }

    fn load_state_dict(&mut self, sd: &Value) -> Result<()> {
        let (group, state) = split(sd, self.params.len())?;
        if boolean(group, "maximize")? {
            return Err(bad(
                "param group \"maximize\" is True, which is not supported",
            ));
        }
        let mut buffers = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            buffers.push(match param_state(state, i) {
                Some(s) => state_tensor(s, "momentum_buffer", p)?,
                None => None,
            });
        }
        self.lr = float(group, "lr")?;
        self.momentum = float(group, "momentum")?;
        self.dampening = float(group, "dampening")?;
        self.weight_decay = float(group, "weight_decay")?;
        self.nesterov = boolean(group, "nesterov")?;
        self.buffers = buffers;
        Ok(())
    }
}

impl std::fmt::Debug for Sgd {
    /// The hyperparameters and the number of parameters (not the tensors).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sgd")
            .field("params", &self.params.len())
            .field("lr", &self.lr)
            .field("momentum", &self.momentum)
            .field("dampening", &self.dampening)
            .field("weight_decay", &self.weight_decay)
            .field("nesterov", &self.nesterov)
            .finish_non_exhaustive()
    }
}

/// `torch.optim.Adam` and `torch.optim.AdamW` (decoupled weight decay).
pub struct Adam {
    params: Vec<Tensor>,
    /// Learning rate.
    pub lr: f64,
    /// Coefficients of the running averages.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay (L2 for Adam, decoupled for AdamW).
    pub weight_decay: f64,
    /// AMSGrad variant.
    pub amsgrad: bool,
    /// AdamW's decoupled weight decay.
    pub decoupled_weight_decay: bool,
    steps: Vec<f64>,
    exp_avg: Vec<Option<Tensor>>,
    exp_avg_sq: Vec<Option<Tensor>>,
    max_exp_avg_sq: Vec<Option<Tensor>>,
}

impl std::fmt::Debug for Adam {
    /// The hyperparameters and the number of parameters (not the tensors).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adam")
            .field("params", &self.params.len())
            .field("lr", &self.lr)
            .field("betas", &self.betas)
            .field("eps", &self.eps)
            .field("weight_decay", &self.weight_decay)
            .field("amsgrad", &self.amsgrad)
            .field("decoupled_weight_decay", &self.decoupled_weight_decay)
            .finish_non_exhaustive()
    }
}

impl Adam {
    /// `torch.optim.Adam(params, lr)` with PyTorch's defaults.
    #[allow(clippy::self_named_constructors)] // mirrors `torch.optim.Adam` beside `adamw`
    pub fn adam(params: Vec<Tensor>, lr: f64) -> Adam {
        let n = params.len();
        Adam {
            params,
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            decoupled_weight_decay: false,
            steps: vec![0.0; n],
            exp_avg: (0..n).map(|_| None).collect(),
            exp_avg_sq: (0..n).map(|_| None).collect(),
            max_exp_avg_sq: (0..n).map(|_| None).collect(),
        }
    }
    /// `torch.optim.AdamW(params, lr, weight_decay=wd)` with PyTorch's other defaults.
    pub fn adamw(params: Vec<Tensor>, lr: f64, weight_decay: f64) -> Adam {
        Adam {
            weight_decay,
            decoupled_weight_decay: true,
            ..Adam::adam(params, lr)
        }
    }
    /// Sets betas.
    pub fn betas(mut self, b1: f64, b2: f64) -> Adam {
        self.betas = (b1, b2);
        self
    }
    /// Sets eps.
    pub fn eps(mut self, eps: f64) -> Adam {
        self.eps = eps;
        self
    }
    /// Sets the weight decay.
    pub fn weight_decay(mut self, wd: f64) -> Adam {
        self.weight_decay = wd;
        self
    }
    /// Sets AMSGrad.
    pub fn amsgrad(mut self, amsgrad: bool) -> Adam {
        self.amsgrad = amsgrad;
        self
    }
}

impl Optimizer for Adam {
    fn params(&self) -> &[Tensor] {
        &self.params
    }

    fn step_with(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        check_grads(grads, self.params.len())?;
        let (b1, b2) = self.betas;
        tch::no_grad(|| {
            for (i, g) in grads.iter().enumerate() {
                let Some(g) = g else { continue };
                let p = &mut self.params[i];
                self.steps[i] += 1.0;
                let step = self.steps[i];
                let g = if self.weight_decay != 0.0 && !self.decoupled_weight_decay {
                    g + &*p * self.weight_decay
                } else {
                    g.shallow_clone()
                };
                if self.weight_decay != 0.0 && self.decoupled_weight_decay {
                    let _ = p.g_mul_scalar_(1.0 - self.lr * self.weight_decay);
                }
                let m = self.exp_avg[i].get_or_insert_with(|| p.zeros_like());
                let _ = m.lerp_(&g, 1.0 - b1);
                let v = self.exp_avg_sq[i].get_or_insert_with(|| p.zeros_like());
                let _ = v.g_mul_scalar_(b2);
                // addcmul_(grad, grad, value=1-beta2), evaluated as torch's CPU kernel does:
                // (value * grad) * grad.
                let _ = v.g_add_(&((&g * (1.0 - b2)) * &g));
                let bc1 = 1.0 - b1.powf(step);
                let bc2_sqrt = (1.0 - b2.powf(step)).sqrt();
                let step_size = self.lr / bc1;
                let denom = if self.amsgrad {
                    let mx = self.max_exp_avg_sq[i].get_or_insert_with(|| p.zeros_like());
                    let newmax = mx.maximum(v);
                    mx.copy_(&newmax);
                    (mx.sqrt() / bc2_sqrt) + self.eps
                } else {
                    (v.sqrt() / bc2_sqrt) + self.eps
                };
                // addcdiv_(exp_avg, denom, value=-step_size) = (value * exp_avg) / denom.
                let _ = p.g_add_(&((&*m * -step_size) / &denom));
            }
        });
        Ok(())
    }

    fn state_dict(&self) -> Result<Value> {
        let mut state = Dict::new();
        for i in 0..self.params.len() {
            let (Some(m), Some(v)) = (&self.exp_avg[i], &self.exp_avg_sq[i]) else {
                continue;
            };
            let mut s = Dict::new();
            s.insert("step", HostTensor::scalar(self.steps[i] as f32));
            s.insert("exp_avg", host(m)?);
            s.insert("exp_avg_sq", host(v)?);
            if let Some(mx) = &self.max_exp_avg_sq[i] {
                s.insert("max_exp_avg_sq", host(mx)?);
            }
            state.insert(i as i64, s);
        }
        let mut g = Dict::new();
        g.insert("lr", self.lr);
        g.insert(
            "betas",
            Value::Tuple(vec![self.betas.0.into(), self.betas.1.into()]),
        );
        g.insert("eps", self.eps);
        g.insert("weight_decay", self.weight_decay);
        g.insert("amsgrad", self.amsgrad);
        g.insert("maximize", false);
        g.insert("foreach", ());
        g.insert("capturable", false);
        g.insert("differentiable", false);
        g.insert("fused", ());
        g.insert("decoupled_weight_decay", self.decoupled_weight_decay);
        g.insert("params", group_params(self.params.len()));
        let mut sd = Dict::new();
        sd.insert("state", state);
        sd.insert("param_groups", Value::List(vec![Value::Dict(g)]));
        Ok(Value::Dict(sd))
    }

    /// Step 0 and zero averages: what a fresh Adam starts its first step from.
    fn initial_state(&self, i: usize) -> Result<Option<Value>> {
        let Some(p) = self.params.get(i) else {
            return Ok(None);
        };
        let zeros = || tch::no_grad(|| p.zeros_like());
        let mut s = Dict::new();
        s.insert("step", HostTensor::scalar(0f32));
        s.insert("exp_avg", host(&zeros())?);
        s.insert("exp_avg_sq", host(&zeros())?);
        if self.amsgrad {
            s.insert("max_exp_avg_sq", host(&zeros())?);
        }
        Ok(Some(Value::Dict(s)))
    }

    fn load_state_dict(&mut self, sd: &Value) -> Result<()> {
        let (group, state) = split(sd, self.params.len())?;
        if boolean(group, "maximize")? {
            return Err(bad(
                "param group \"maximize\" is True, which is not supported",
            ));
        }
        let n = self.params.len();
        let (mut steps, mut m, mut v, mut mx) = (vec![0.0; n], Vec::new(), Vec::new(), Vec::new());
        for (i, p) in self.params.iter().enumerate() {
            match param_state(state, i) {
                Some(s) => {
                    steps[i] = match s.get("step") {
                        Some(Value::Tensor(t)) => match t.dtype() {
                            crate::DType::Float32 => {
                                t.to_vec::<f32>()?.first().copied().unwrap_or(0.0) as f64
                            }
                            crate::DType::Float64 => {
                                t.to_vec::<f64>()?.first().copied().unwrap_or(0.0)
                            }
                            crate::DType::Int64 => {
                                t.to_vec::<i64>()?.first().copied().unwrap_or(0) as f64
                            }
                            d => return Err(bad(format!("state {i} \"step\" is a {d} tensor"))),
                        },
                        Some(x) => x
                            .as_float()
                            .ok_or_else(|| bad(format!("state {i} \"step\" must be a number")))?,
                        None => return Err(bad(format!("state {i} has no \"step\""))),
                    };
                    m.push(state_tensor(s, "exp_avg", p)?);
                    v.push(state_tensor(s, "exp_avg_sq", p)?);
                    mx.push(state_tensor(s, "max_exp_avg_sq", p)?);
                }
                None => {
                    m.push(None);
                    v.push(None);
                    mx.push(None);
                }
            }
        }
        let betas = group
            .get("betas")
            .and_then(Value::as_seq)
            .ok_or_else(|| bad("param group has no \"betas\" list"))?;
        let [b1, b2] = betas else {
            return Err(bad("param group \"betas\" must be a pair"));
        };
        let beta = |b: &Value, i: usize| {
            b.as_float()
                .ok_or_else(|| bad(format!("param group \"betas\"[{i}] must be a number")))
        };
        self.betas = (beta(b1, 0)?, beta(b2, 1)?);
        self.lr = float(group, "lr")?;
        self.eps = float(group, "eps")?;
        self.weight_decay = float(group, "weight_decay")?;
        self.amsgrad = boolean(group, "amsgrad")?;
        if let Some(Value::Bool(d)) = group.get("decoupled_weight_decay") {
            self.decoupled_weight_decay = *d;
        }
        self.steps = steps;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.max_exp_avg_sq = mx;
        Ok(())
    }
}

/// Where this rank's part of a parameter lies: the parameter's global shape, and the offsets of
/// the local tensor the optimizer steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamPart {
    /// The global parameter's shape.
    pub shape: Vec<usize>,
    /// Where the local tensor starts in it, in every dimension.
    pub offsets: Vec<usize>,
}

/// An optimizer over this rank's parts of the parameters (FSDP-style: each rank steps its own
/// rows), whose state saves as a sharded checkpoint: every per-parameter tensor of its state
/// dict (`exp_avg`, a momentum buffer: any tensor shaped like the local parameter) becomes a
/// [`ShardedTensor`](crate::ShardedTensor) of the global parameter's shape, holding this
/// rank's part, and loading takes this rank's parts back, whatever the world size the
/// checkpoint was saved at ([`dcp::load_state`](crate::dcp::load_state)). A parameter the
/// optimizer has not stepped yet gets its [`initial_state`](Optimizer::initial_state), so a
/// fresh optimizer names every part a load must fill.
///
/// Per-parameter state keys come back from a sharded checkpoint as strings (`"0"`), as DCP
/// flattens them; the optimizer accepts either.
#[derive(Debug)]
pub struct ShardedOptimizer<O> {
    inner: O,
    parts: Vec<ParamPart>,
}

impl<O: Optimizer> ShardedOptimizer<O> {
    /// `inner`, whose parameter `i` is the part `parts[i]` of its global parameter. Refused
    /// when the counts differ or a local parameter does not fit its global shape there.
    pub fn new(inner: O, parts: Vec<ParamPart>) -> Result<Self> {
        let params = inner.params();
        if params.len() != parts.len() {
            return Err(bad(format!(
                "{} parameter parts for an optimizer of {} parameters",
                parts.len(),
                params.len()
            )));
        }
        for (i, (p, part)) in params.iter().zip(&parts).enumerate() {
            let local: Vec<usize> = p.size().iter().map(|&d| d as usize).collect();
            crate::dcp::Chunk::new(part.offsets.clone(), local)
                .check_inside(&part.shape)
                .map_err(|r| bad(format!("parameter {i}: {r}")))?;
        }
        Ok(ShardedOptimizer { inner, parts })
    }

    /// The optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// The optimizer, mutably (to step it).
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.inner
    }

    /// The local shape of parameter `i`.
    fn local_shape(&self, i: usize) -> Vec<usize> {
        self.inner.params()[i]
            .size()
            .iter()
            .map(|&d| d as usize)
            .collect()
    }

    /// Parameter `i`'s state with each tensor shaped like it made its part of the global one.
    fn shard(&self, i: usize, s: &Value) -> Result<Value> {
        let local = self.local_shape(i);
        let part = &self.parts[i];
        let mut out = Dict::new();
        for (k, v) in s
            .as_dict()
            .ok_or_else(|| bad(format!("state {i} is not a dict")))?
            .iter()
        {
            let v = match v {
                Value::Tensor(t) if t.shape() == local.as_slice() => Value::Sharded(
                    crate::ShardedTensor::new(part.shape.clone(), t.dtype())
                        .with_shard(part.offsets.clone(), t.clone())?,
                ),
                other => other.clone(),
            };
            out.insert(k.clone(), v);
        }
        Ok(Value::Dict(out))
    }

    /// Parameter `i`'s state with each sharded tensor back to its one local part.
    fn unshard(&self, i: usize, s: &Value) -> Result<Value> {
        let part = &self.parts[i];
        let mut out = Dict::new();
        for (k, v) in s
            .as_dict()
            .ok_or_else(|| bad(format!("state {i} is not a dict")))?
            .iter()
        {
            let v = match v {
                Value::Sharded(t) => match t.shards() {
                    [one] if one.chunk.offsets == part.offsets => one.tensor.clone(),
                    _ => {
                        return Err(bad(format!(
                            "state {i} {k}: expected this rank's one part at {:?}",
                            part.offsets
                        )))
                    }
                },
                other => other.clone(),
            };
            out.insert(k.clone(), v);
        }
        Ok(Value::Dict(out))
    }

    /// `sd` with its per-parameter state mapped by `f(i, state)`, keyed by index.
    fn map_state(
        &self,
        sd: &Value,
        mut f: impl FnMut(usize, Option<&Value>) -> Result<Option<Value>>,
    ) -> Result<Value> {
        let (_, state) = split(sd, self.parts.len())?;
        let mut out = Dict::new();
        for i in 0..self.parts.len() {
            let s = param_state(state, i).map(|d| Value::Dict(d.clone()));
            if let Some(v) = f(i, s.as_ref())? {
                out.insert(i as i64, v);
            }
        }
        let mut sd = sd.as_dict().cloned().unwrap_or_default();
        sd.insert("state", out);
        Ok(Value::Dict(sd))
    }
}

impl<O: Optimizer> crate::state::Stateful for ShardedOptimizer<O> {
    fn state_dict(&self) -> Result<Value> {
        let sd = self.inner.state_dict()?;
        self.map_state(&sd, |i, s| {
            let s = match s {
                Some(s) => Some(s.clone()),
                None => self.inner.initial_state(i)?,
            };
            s.map(|s| self.shard(i, &s)).transpose()
        })
    }

    fn load_state_dict(&mut self, sd: &Value) -> Result<()> {
        let local = self.map_state(sd, |i, s| s.map(|s| self.unshard(i, s)).transpose())?;
        self.inner.load_state_dict(&local)
    }
}
