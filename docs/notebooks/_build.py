"""Build the example notebooks from the cells below (nbformat) and execute them (nbclient).

    python docs/notebooks/_build.py              # build and execute all four, outputs saved
    python docs/notebooks/_build.py --only 02    # one notebook
    python docs/notebooks/_build.py --no-execute # build only (no outputs)

The notebooks are the product; this file is how they are written, so that a change to one cell
is a reviewable diff. Each notebook must run top to bottom in under 2 minutes on 2 CPU cores
(``tests/test_notebooks.py`` checks it).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str) -> nbformat.NotebookNode:
    return new_markdown_cell(text.strip("\n"))


def code(text: str) -> nbformat.NotebookNode:
    return new_code_cell(text.strip("\n"))


SETUP = """
%matplotlib inline
import tempfile, time, warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import probopt.diagnostics as diag

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm, imported by Pyro
torch.manual_seed(0)
torch.set_num_threads(2)
FIGDIR = Path(tempfile.mkdtemp())  # PNG copies of the views (headless saving)
"""

# --------------------------------------------------------------------------------------------
# 1. How noisy are my gradients?

NB1 = [
    md(r"""
# How noisy are my gradients?

A minibatch gradient $\hat g_t$ is a noisy observation of the true gradient $g_t$ of the training
loss. **VSGD** (Chen, Kuzina, Esmaeili & Tomczak, 2024) makes that explicit, per coordinate:

$$
w_g \sim \mathrm{Gamma}(\gamma, \gamma),\quad
w_{\hat g} \sim \mathrm{Gamma}(\gamma, K_g\gamma),\quad
g_t \sim \mathcal N(\mu_{t-1}, w_g^{-1}),\quad
\hat g_t \sim \mathcal N(g_t, w_{\hat g}^{-1}),
$$

and at every step it updates a Gaussian posterior $q(g_t) = \mathcal N(\mu_t, \sigma_t^2)$ and two
Gamma posteriors of the precisions. The step uses $\mu_t/\sqrt{\mu_t^2 + \sigma_t^2}$: the
optimizer *knows* how sure it is of each gradient coordinate.

This notebook trains a small network on real handwritten digits with `probopt.optim.VSGD`,
records that posterior with `probopt.diagnostics.Recorder` (optimizer step hooks: the optimizer
is not modified), and reads it as an ArviZ `DataTree`:

* the posterior of chosen gradient coordinates over training, with HDI bands;
* the signal-to-noise ratio $\mu_t^2/\sigma_t^2$ per layer;
* the learned momentum $\beta_t$ (the weight of $\mu_{t-1}$ in $\mu_t$) per layer;
* VSGD's estimate of the gradient noise next to the design-based (survey-sampling) variance of
  the same minibatches.
"""),
    code(SETUP),
    md(r"""
## Data, network, optimizer, recorder

`digits` is scikit-learn's bundled set of 1797 real 8×8 handwritten digits (1438 for training).
The recorder reads every tensor's posterior at every step, keeps two coordinates per
tensor individually, and, every 5 steps, the per-example gradients of the last layer to
estimate the design variance of the minibatch mean (`estimator=`; a uniform estimator here,
the plain shuffled minibatch).
"""),
    code("""
from probopt.experiments import load_dataset, make_network
from probopt.experiments.training import evaluate
from probopt.optim import VSGD
from probopt.sampling import train_epoch
from probopt.sampling.gradient_estimator import UniformEstimator

data = load_dataset("digits")
x, y = data.x_train, data.y_train
net = make_network("mlp", data.input_shape, data.num_classes, hidden=(64, 32), seed=0)
opt = VSGD(net.parameters(), lr=0.01)
est = UniformEstimator()
est.setup(net, x, y)

def loss_fn(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")

rec = diag.Recorder(opt, model=net, coordinates=2, every=1,
                    estimator=est, variance_every=5, variance_params="last")
print(rec)
"""),
    code("""
start = time.perf_counter()
for epoch in range(6):
    train_loss = train_epoch(net, opt, est, loss_fn, x, y, batch_size=32,
                             generator=torch.Generator().manual_seed(epoch))
test_loss, test_acc = evaluate(net, data.x_test, data.y_test)
print(f"{rec.step} steps in {time.perf_counter() - start:.1f} s; "
      f"test accuracy {100 * test_acc:.1f} %")
"""),
    md(r"""
## The DataTree

`to_datatree` gives an `xarray.DataTree` with named dimensions: `layers` (step × parameter:
each quantity summarised over a tensor), `coordinates` (step × coordinate: the chosen
coordinates themselves) and `estimator` (step: the batch's loss and estimated design
variances). Each variable's `statistic` attribute says how a tensor was summarised (RMS for
gradients and means, mean for variances and $\beta$, geometric mean for precisions,
$\sum\mu^2/\sum\sigma^2$ for the SNR).
"""),
    code("""
dt = rec.to_datatree()
print(dt)
"""),
    md(r"""
## Posterior of the true gradient, coordinate by coordinate

The line is the posterior mean $\mu_t$, the band its 94 % highest-density interval (for a
Gaussian: $\mu_t \pm 1.88\,\sigma_t$), the dots the observed minibatch gradients $\hat g_t$.
$\mu_t$ follows the dots with momentum $\beta_t$; the band is VSGD's uncertainty about the
*true* gradient. Early in training it is wide because the prior is vague; later it narrows as
the gradients shrink, but it stays about as wide as the scatter of the observations: VSGD keeps
treating single minibatches as weak evidence.
"""),
    code("""
fig = diag.plot_gradient_bands(dt, max_panels=4)
fig.savefig(FIGDIR / "bands.png")
fig
"""),
    md(r"""
## Signal-to-noise ratio per layer

$\log_{10}$ of $\sum_i \mu_{t,i}^2 / \sum_i \sigma_{t,i}^2$ per tensor: above 0 the posterior is
confident about the direction of the layer's gradient, far below 0 the step is mostly noise.
"""),
    code("""
fig = diag.plot_snr_heatmap(dt)
fig.savefig(FIGDIR / "snr.png")
fig
"""),
    code("""
import pandas as pd

snr = dt["layers"]["snr"].to_pandas()  # steps x tensors
pd.DataFrame({"median SNR, first 20 records": snr.iloc[:20].median(),
              "median SNR, last 20 records": snr.iloc[-20:].median()}).round(4)
"""),
    md(r"""
## Learned momentum $\beta_t$

$\mu_t = \beta_t\,\mu_{t-1} + (1-\beta_t)\,\hat g_t$ with
$\beta_t = v_{\hat g}/(v_g + v_{\hat g})$, $v = 1/\mathbb E_q[w]$ from the rates *before* the step.
At the first step every coordinate has the prior value $K_g/(1+K_g) = 0.968$; with VSGD's weak
default prior ($\gamma = 10^{-8}$) the first update of the rates moves it to about 0.5–0.85, and
from there it is learned per coordinate: where the observation noise dominates the drift of the
true gradient, $\beta_t$ rises (longer memory), where the gradient moves fast it falls.
"""),
    code("""
fig = diag.plot_beta(dt)
fig.savefig(FIGDIR / "beta.png")
fig
"""),
    md(r"""
## Two estimates of the gradient noise

VSGD's model says the minibatch gradient of coordinate $i$ has noise variance
$1/\mathbb E_q[w_{\hat g,i}]$. Survey sampling gives an independent, model-free estimate: a
shuffled minibatch is a simple random sample of $n$ of the $N$ training examples, and the
variance of its mean gradient is $\frac{1-f}{n} S^2$, estimated from each batch's per-example
gradients (the `estimator` group; last layer only, as configured above). Both are traces over
the last layer's coordinates.
"""),
    code("""
last = [p for name, p in net.named_parameters() if name.startswith("4.")]
v_g = [1 / opt.precisions(p)[0] for p in last]      # 1/E[w_g]: drift of the true gradient
v_ghat = [1 / opt.precisions(p)[1] for p in last]   # 1/E[w_ghat]: observation noise
noise = sum(float(v.sum()) for v in v_ghat)
sigma2 = sum(float((a * b / (a + b)).sum()) for a, b in zip(v_g, v_ghat))  # next step's sigma^2
design = float(dt["estimator"]["uniform_variance"][-20:].mean())  # mean of unbiased estimates
print(f"VSGD observation-noise variance, sum over the last layer:  {noise:.3g}")
print(f"VSGD posterior variance sigma^2 of the true gradient (sum): {sigma2:.3g}")
print(f"design variance of the minibatch mean (mean, last 20):     {design:.3g}")
print(f"VSGD noise / design variance: {noise / design:.2f}")
fig = diag.plot_estimator_variance(dt)
fig.savefig(FIGDIR / "design_variance.png")
fig
"""),
    md(r"""
The two estimates come from different arguments. The design variance is the spread of the
minibatch mean around the full-data gradient *at fixed parameters*, from the per-example
gradients of each batch (the per-batch estimates are heavy-tailed, so the mean of the last 20
unbiased estimates is used, not a median). VSGD's $1/\mathbb E[w_{\hat g}]$ is learned by SVI
across steps and is roughly the average of $\sigma_t^2 + (\mu_t - \hat g_t)^2$, so it also
absorbs the drift of the gradient that $\mu_t$ does not follow. On this run they agree within
the factor printed above: VSGD's noise model has found the sampling noise of the minibatches.
Its posterior variance $\sigma_t^2$ of the *true* gradient is smaller, but of the same order:
pooling earlier minibatches through the momentum buys only a modest reduction of uncertainty,
which is why the SNR falls as the gradients shrink late in training.

## Saving and loading

One netCDF file holds every group; `load` reads it back exactly.
"""),
    code("""
import xarray as xr

path = diag.save(dt, FIGDIR / "vsgd_digits.nc")
back = diag.load(path)
xr.testing.assert_identical(back, dt)
print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB, groups {sorted(back.children)}")
"""),
]


# --------------------------------------------------------------------------------------------
# 2. Your own gradient model

NB2 = [
    md(r"""
# Write your own gradient-noise model in Pyro and train with it

`probopt.optim.GradientModelOptimizer` turns *any* Pyro model of one step's observed gradient
into an optimizer. The contract, per parameter tensor and per step:

* `model(g_hat, prev_mean, **kw)` generates the observed gradient `g_hat` (flattened, a plate
  over its coordinates at `dim=-1`) given the previous posterior mean `prev_mean`;
* `guide(g_hat, prev_mean, **kw)` is the variational family; its site `"g"` is the true
  gradient, whose parameters `g_loc`, `g_scale` are *local* (fitted afresh each step); every
  other guide parameter is *global* and carried across steps (stochastic variational inference,
  with steps $\rho_t = t^{-\kappa}$);
* the step is $\theta \leftarrow \theta - \eta\, m/\sqrt{m^2 + v}$ with $(m, v)$ the posterior
  mean and variance of $g_t$ (other rules: `rule="mean"`, `"snr"` or your own function).

VSGD's closed form is this path for one particular model (the test suite checks that the generic
path with `probopt.models.vsgd` tracks `VSGD`). Here we write a different model, train a
classifier with it, check what it learned about the gradient noise against the exact answer,
and look at its posterior with ArviZ, including **posterior draws** (chains × draws), on which
ESS and $\hat R$ apply.
"""),
    code(SETUP),
    md(r"""
## A model with pooled noise

VSGD gives every coordinate its own observation-noise precision $w_{\hat g,i}$, which takes many
steps to learn. If the minibatch noise has about the same size across a tensor, one precision
per *tensor* can be learned from all its coordinates at once:

$$
w_{\hat g} \sim \mathrm{Gamma}(\gamma, K\gamma), \quad
w_{g,i} \sim \mathrm{Gamma}(\gamma, \gamma), \quad
g_{t,i} \sim \mathcal N(\mu_{t-1,i}, w_{g,i}^{-1}), \quad
\hat g_{t,i} \sim \mathcal N(g_{t,i}, w_{\hat g}^{-1}).
$$

The guide is mean-field: a Gamma for the shared $w_{\hat g}$ (outside the plate), a Gamma per
coordinate for $w_{g,i}$, and the local Normal $q(g_t)$. Its parameters start where one exact
coordinate-ascent step from the first observation would put them (the first innovation
$r = \hat g_1 - \mu_0$ split between drift and noise in the prior ratio $1 : K$), because the
optimizer refines them with only a few SVI steps per training step.
"""),
    code("""
import pyro
import pyro.distributions as dist
from torch.distributions import constraints


def pooled_model(g_hat, prev_mean, *, variance_ratio=30.0, prior_strength=0.01):
    gamma, k = prior_strength, variance_ratio
    w_ghat = pyro.sample("w_ghat", dist.Gamma(gamma, k * gamma))  # one for the whole tensor
    with pyro.plate("coords", g_hat.shape[-1], dim=-1):
        w_g = pyro.sample("w_g", dist.Gamma(gamma, gamma))
        g = pyro.sample("g", dist.Normal(prev_mean, w_g.rsqrt()))
        pyro.sample("g_hat", dist.Normal(g, w_ghat.rsqrt()), obs=g_hat)


def pooled_guide(g_hat, prev_mean, *, variance_ratio=30.0, prior_strength=0.01):
    gamma, k = prior_strength, variance_ratio
    d, positive = g_hat.shape[-1], constraints.positive
    r2 = (g_hat - prev_mean).detach() ** 2  # used only to initialise the global parameters
    a_h = pyro.param("w_ghat_shape", lambda: torch.tensor(gamma + d / 2), constraint=positive)
    b_h = pyro.param("w_ghat_rate", lambda: k * gamma + 0.5 * r2.sum() * k / (1 + k),
                     constraint=positive)
    a_g = pyro.param("w_g_shape", lambda: torch.full_like(g_hat, gamma + 0.5),
                     constraint=positive)
    b_g = pyro.param("w_g_rate", lambda: gamma + 0.5 * r2 / (1 + k), constraint=positive)
    loc = pyro.param("g_loc", lambda: prev_mean.detach().clone())  # local
    scale = pyro.param("g_scale", lambda: (b_g / a_g).detach().sqrt(), constraint=positive)
    pyro.sample("w_ghat", dist.Gamma(a_h, b_h))
    with pyro.plate("coords", d, dim=-1):
        pyro.sample("w_g", dist.Gamma(a_g, b_g))
        pyro.sample("g", dist.Normal(loc, scale))
"""),
    md(r"""
## Train a classifier two ways

Softmax regression on the iris measurements (120 training flowers, 4 features, 3 classes;
`Linear(4, 3)` without bias: one tensor of 12 coordinates), minibatches of 16, from the same
initial weights and the same minibatches: `VSGD` (its model, in closed form) and the generic
path with the pooled model (10 SVI steps of 8 particles per training step). A `Recorder` on
each; on the generic path it also keeps $4 \times 100$ draws from $q(g_t)$ of the chosen
coordinates every 10 steps.
"""),
    code("""
from probopt.experiments import load_dataset
from probopt.experiments.training import evaluate
from probopt.optim import VSGD, GradientModelOptimizer

data = load_dataset("iris")
x, y = data.x_train, data.y_train


def make_net():
    torch.manual_seed(0)
    return nn.Linear(4, 3, bias=False)


nets = {"vsgd": make_net(), "pooled": make_net()}
opts = {
    "vsgd": VSGD(nets["vsgd"].parameters(), lr=0.05),
    "pooled": GradientModelOptimizer(nets["pooled"].parameters(), pooled_model, pooled_guide,
                                     lr=0.05, svi_steps=10, num_particles=8),
}
recs = {
    "vsgd": diag.Recorder(opts["vsgd"], model=nets["vsgd"], coordinates=3, seed=1),
    "pooled": diag.Recorder(opts["pooled"], model=nets["pooled"], coordinates=3, seed=1,
                            draws=(4, 100), draw_every=10),
}
batches = torch.Generator().manual_seed(0)
start = time.perf_counter()
for step in range(60):
    index = torch.randint(0, len(x), (16,), generator=batches)
    for name, net in nets.items():
        opts[name].zero_grad()
        nn.functional.cross_entropy(net(x[index]), y[index]).backward()
        opts[name].step()
print(f"60 steps of both optimizers in {time.perf_counter() - start:.1f} s")
for name, net in nets.items():
    train_loss, _ = evaluate(net, x, y)
    _, test_acc = evaluate(net, data.x_test, data.y_test)
    print(f"{name:7s} training loss {train_loss:.3f}   test accuracy {100 * test_acc:.1f} %")
"""),
    md(r"""
## What each model believes about the gradient

The generic path reports the posterior $(\mu_t, \sigma_t^2)$ of whatever model it fits, and an
*implied* momentum $\beta_t = (\hat g_t - \mu_t)/(\hat g_t - \mu_{t-1})$ (for VSGD's model it is
VSGD's $\beta_t$).
"""),
    code("""
import pandas as pd

trees = {name: rec.to_datatree() for name, rec in recs.items()}
rows = {}
for name, dt in trees.items():
    layers = dt["layers"].isel(parameter=0)
    rows[name] = {
        "mean beta, steps 1-10": float(layers["beta"][:10].mean()),
        "mean beta, steps 51-60": float(layers["beta"][-10:].mean()),
        "mean sigma^2, steps 51-60": float(layers["variance"][-10:].mean()),
        "SNR, steps 51-60": float(layers["snr"][-10:].mean()),
    }
pd.DataFrame(rows).T.round(4)
"""),
    md(r"""
### Checking the noise model against the exact answer

Both models estimate the variance of the minibatch gradient's noise. On a training set this
small the truth is computable: the per-example gradients of all 120 flowers give the exact
design variance of the mean of a simple random sample of 16 (no model involved). The
diagnostics make the check one cell:
"""),
    code("""
from probopt.sampling import per_example_grads, srs_design_variance


def loss_fn(out, t):
    return nn.functional.cross_entropy(out, t, reduction="none")


state = opts["pooled"].state[nets["pooled"].weight]["param_store"]
fitted = {name: torch.distributions.transform_to(state["constraints"][name])(value).detach()
          for name, value in state["params"].items()}
rows = {}
for name, net in nets.items():
    grads = per_example_grads(net, loss_fn, x, y, flat=True)
    exact = float(srs_design_variance(grads, 16, trace=True)) / grads.shape[1]
    if name == "vsgd":
        noise = float((1 / opts["vsgd"].precisions(net.weight)[1]).mean())
    else:
        noise = float(fitted["w_ghat_rate"] / fitted["w_ghat_shape"])
    rows[name] = {"model's noise variance (per coordinate)": noise,
                  "exact design variance (per coordinate)": exact, "ratio": noise / exact}
pd.DataFrame(rows).T.round(5)
"""),
    md(r"""
The pooled model overestimates the noise by much more than VSGD does. The reason is visible in
the model: its single $w_{\hat g}$ is fitted to $\sum_i \mathbb E_q[(\hat g_{t,i} - g_{t,i})^2]$,
which includes the posterior variances $\sigma_{t,i}^2$, and those in turn grow with the noise
variance: a fixed point where posterior uncertainty and noise feed each other. VSGD has the
same loop per coordinate, but in this run it settles much lower. A model that looks sensible on
paper can learn the wrong noise level, and the recorder plus an exact design variance show it in
a few lines.

## Posterior bands and posterior draws

The bands are the Gaussian 94 % HDI $\mu_t \pm 1.88\sigma_t$ at every step; the red bars, every
10 steps, the 94 % HDI computed by ArviZ from the $4 \times 100$ draws of $q(g_t)$. They must
agree: a mismatch would mean that the moments the optimizer used and the distribution it
sampled differ.
"""),
    code("""
fig = diag.plot_gradient_bands(trees["pooled"])
fig.savefig(FIGDIR / "pooled_bands.png")
fig
"""),
    md(r"""
The draws are stored as `(chain, draw, step, coordinate)` in the `posterior` group, so every
ArviZ diagnostic applies. Draws from a variational posterior are independent: bulk ESS should
be close to the 400 draws and $\hat R$ close to 1. `arviz_stats.summary` on the last recorded
step:
"""),
    code("""
import arviz_stats as azs

post = trees["pooled"]["posterior"].to_dataset().isel(step=-1)
azs.summary(post, var_names=["gradient"], ci_kind="hdi", ci_prob=0.94)
"""),
    code("""
fig = diag.plot_draw_diagnostics(trees["pooled"])
fig.savefig(FIGDIR / "pooled_draws.png")
fig
"""),
    md(r"""
## Learned momentum

VSGD's $\beta_t$ against the pooled model's implied one (mean over the tensor):
"""),
    code("""
from matplotlib.figure import Figure

fig = Figure(figsize=(6.4, 3.0), layout="constrained")
ax = fig.subplots()
for name, dt in trees.items():
    layers = dt["layers"].isel(parameter=0)
    ax.plot(layers["step"], layers["beta"], label=name)
ax.set_xlabel("step")
ax.set_ylabel(r"mean $\\beta_t$")
ax.legend()
fig
"""),
    md(r"""
Where next: `models/student_t.py` is a heavy-tailed variant (a Student-t observation) written
the same way. Once a model behaves on the generic path, its closed form, if it has one, can be
derived and checked against it, as `tests/optim/test_gradient_model.py` does for VSGD.
"""),
]

# --------------------------------------------------------------------------------------------

NOTEBOOKS = {
    "01_how_noisy_are_my_gradients.ipynb": NB1,
    "02_your_own_gradient_model.ipynb": NB2,
}


def build(name: str, cells: list) -> nbformat.NotebookNode:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}  # fmt: skip
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 600) -> float:
    from nbclient import NotebookClient

    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(HERE)}}).execute()  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="prefix of the notebooks to build")
    parser.add_argument("--no-execute", action="store_true")
    args = parser.parse_args()
    for name, cells in NOTEBOOKS.items():
        if args.only and not name.startswith(args.only):
            continue
        nb = build(name, cells)
        if not args.no_execute:
            seconds = execute(nb)
            print(f"{name}: executed in {seconds:.1f} s")
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
