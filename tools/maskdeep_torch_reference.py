"""An independent PyTorch MaskDeep loss, written from the method's description (docs/METHOD.md),
and a parity check against a step case that `trainer step-case` wrote.

The case file holds the online and target weights, standard-normal views, the visible cells on
the mask grid (the coarsest masked level unless the config's `mask_grid` names another) and our
loss per level and gradients. This script builds the ResNet (torchvision's layout and names;
small stem: 3x3 conv, stride 1, no max-pool), the projector and predictor MLPs of every masked
level (Linear, BatchNorm, ReLU, Linear), loads the weights, and recomputes:
  online: the encoder runs once on all global views; each masked level's feature map is pooled
          over the visible cells of each (view, sample, group) -- the mask upsampled by nearest
          neighbour to a finer level's grid, or averaged over the cells of a coarser one (each
          cell weighs its visible share) -- then projector and predictor;
  target: the unmasked global views through the target encoder, global average pool of each
          level, target projector; no gradient;
  loss:   per level, 2 - 2 cos(prediction, target) averaged over groups, online views and their
          targets (all global views, or only the other ones with targets=cross) and the batch;
          the total sums the levels with their weights.
BatchNorm runs in training mode over the whole batch of rows it is given (the encoder over all
global views at once, the heads over all views x samples x groups), as in the trainer; in the
heads over each view's rows alone when the case's config says `head_bn: per_view`; with
--bn separate, in the encoder and the heads over each view's rows alone (what per-view PyTorch
code does), to measure that choice.

Usage: python tools/maskdeep_torch_reference.py CASE.safetensors [--bn joint|separate]
Prints the loss per level of both and the worst relative gradient error; exits 1 when the loss
differs by more than 1e-5 (relative) or a gradient by more than 1e-4.
"""
import argparse, json, sys
import torch, torch.nn as nn, torch.nn.functional as F
from safetensors.torch import load_file
from safetensors import safe_open

torch.set_default_dtype(torch.float32)

p = argparse.ArgumentParser()
p.add_argument("case")
p.add_argument("--bn", choices=["joint", "separate"], default="joint")
p.add_argument("--f64", action="store_true", help="also compute in float64 and compare both f32 results with it")
args = p.parse_args()
tensors = load_file(args.case)
with safe_open(args.case, "pt") as f:
    meta = f.metadata()
cfg = json.loads(meta["config"])
grid = tuple(int(v) for v in meta["grid"].split("x"))


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = nn.Sequential(nn.Conv2d(cin, width, 1, stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """Returns C3, C4, C5."""

    def __init__(self, arch, width, small_stem):
        super().__init__()
        block, counts = {
            "resnet18": (Basic, [2, 2, 2, 2]),
            "resnet34": (Basic, [3, 4, 6, 3]),
            "resnet50": (Bottleneck, [3, 4, 6, 3]),
        }[arch]
        widths = [max(1, round(64 * 2**i * width)) for i in range(4)]
        stem = widths[0]
        self.small_stem = small_stem
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False) if small_stem else nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        cin = stem
        for i, (w, n) in enumerate(zip(widths, counts)):
            layers = []
            for k in range(n):
                layers.append(block(cin, w, 2 if (k == 0 and i > 0) else 1))
                cin = w * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.channels = [widths[i] * block.expansion for i in (1, 2, 3)]

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        if not self.small_stem:
            x = F.max_pool2d(x, 3, 2, 1)
        x = self.layer1(x)
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]


def mlp(cin, hidden, out):
    return nn.Sequential(nn.Linear(cin, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out))


LEVEL = {"c3": 0, "c4": 1, "c5": 2}
levels = [LEVEL[l] if isinstance(l, str) else LEVEL[l.lower()] for l in cfg["levels"]]
level_names = [["c3", "c4", "c5"][l] for l in levels]


class Branch(nn.Module):
    def __init__(self, predictors):
        super().__init__()
        self.backbone = ResNet(cfg["arch"], cfg["width"], cfg["small_stem"])
        ch = self.backbone.channels
        self.projector = nn.ModuleDict({n: mlp(ch[l], cfg["proj_hidden"], cfg["proj_dim"]) for n, l in zip(level_names, levels)})
        if predictors:
            self.predictor = nn.ModuleDict({n: mlp(cfg["proj_dim"], cfg["pred_hidden"], cfg["proj_dim"]) for n in level_names})


def load(branch, prefix, dtype):
    """Our names are `backbone.<torchvision name>`, `projector.<level>.<i>.*`, `predictor.<level>.<i>.*`."""
    state = {}
    for k, v in tensors.items():
        if k.startswith(prefix + "."):
            state[k[len(prefix) + 1:]] = v.to(dtype) if v.is_floating_point() else v
    own = branch.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unused = [k for k in state if k not in own]
    if missing or unused:
        sys.exit(f"{prefix}: names differ; missing {missing[:5]}, unused {unused[:5]}")
    branch.load_state_dict(state, strict=False)
    branch.train()


def recompute(dtype):
    """The loss per level and every online gradient, computed in `dtype`."""
    global online, target, x, visible
    torch.set_default_dtype(dtype)
    online, target = Branch(True), Branch(False)
    online.to(dtype)
    target.to(dtype)
    load(online, "online", dtype)
    load(target, "target", dtype)
    for q in target.parameters():
        q.requires_grad_(False)

    x = tensors["views"].to(dtype)
    visible = tensors["visible"].bool()  # [views * batch, groups, cells] on the coarse grid
    B, V, G = cfg["batch_size"], cfg["global_views"], cfg["groups"]


    heads_per_view = args.bn == "separate" or cfg.get("head_bn", "joint") == "per_view"


    def heads(mod, rows_per_view, x):
        """An MLP over all rows at once, or over each view's rows alone."""
        if not heads_per_view:
            return mod(x)
        return torch.cat([mod(part) for part in x.split(rows_per_view)])


    def pooled(fmap):
        """[V*B, C, h, w] -> [V*B*G, C]: the mean over each (row, group)'s visible cells."""
        n, c, h, w = fmap.shape
        mask = visible.reshape(n * G, 1, *grid).to(fmap.dtype)
        if h >= grid[0]:
            level = F.interpolate(mask, size=(h, w), mode="nearest")
        else:
            level = F.adaptive_avg_pool2d(mask, (h, w))
        level = level.reshape(n, G, h * w)
        weights = level / level.sum(-1, keepdim=True)
        return torch.bmm(weights, fmap.reshape(n, c, h * w).transpose(1, 2)).reshape(n * G, c)


    def encode(backbone, x):
        if args.bn == "joint":
            return backbone(x)
        per_view = [backbone(part) for part in x.split(B)]
        return [torch.cat([f[i] for f in per_view]) for i in range(3)]


    feats = encode(online.backbone, x)
    with torch.no_grad():
        tfeats = encode(target.backbone, x)
    losses = []
    for name, l in zip(level_names, levels):
        pred = heads(online.predictor[name], B * G, heads(online.projector[name], B * G, pooled(feats[l])))
        pred = F.normalize(pred, dim=1).reshape(V, B, G, -1)
        with torch.no_grad():
            z = heads(target.projector[name], B, tfeats[l].mean((2, 3)))
            z = F.normalize(z, dim=1).reshape(V, B, -1)
        terms = []
        for i in range(V):
            for j in range(V):
                if cfg["targets"] == "cross" and i == j:
                    continue
                cos = (pred[i] * z[j].unsqueeze(1)).sum(-1)  # [B, G]
                terms.append(2 - 2 * cos.mean())
        losses.append(torch.stack(terms).mean())
    total = sum(w * l for w, l in zip(cfg["level_weights"], losses))
    total.backward()
    grads = {k: v.grad.double() for k, v in online.named_parameters() if v.grad is not None}
    return [l.item() for l in losses], grads



def worst_error(grads, reference):
    """The largest relative L2 error of `grads` against `reference` and its parameter; gradients
    that are zero in exact arithmetic (a bias before BatchNorm: norm below 1e-6 of the largest)
    hold only rounding noise and are skipped."""
    largest = max(g.norm().item() for g in reference.values())
    worst, name, compared = 0.0, "", 0
    for k, ref in reference.items():
        if ref.norm().item() < 1e-6 * largest:
            continue
        rel = ((grads[k] - ref).norm() / ref.norm()).item()
        compared += 1
        if rel > worst:
            worst, name = rel, k
    return worst, name, compared


losses, grads = recompute(torch.float32)
ours = {}
for k in grads:
    if f"grad.{k}" not in tensors:
        sys.exit(f"the case has no gradient for {k}")
    ours[k] = tensors[f"grad.{k}"].double()
worst_loss = 0.0
for name, l in zip(level_names, losses):
    mine = tensors[f"loss.{name}"].item()
    rel = abs(l - mine) / max(abs(mine), 1e-30)
    worst_loss = max(worst_loss, rel)
    print(f"loss {name}: torch {l:.7f}  ours {mine:.7f}  rel {rel:.2e}")
worst, name, compared = worst_error(ours, grads)
print(f"gradients: {compared} compared, worst relative error {worst:.2e} ({name})")
ok = worst_loss <= 1e-5 and worst <= 1e-4
if args.f64:
    # Deep nets with small batches can be ill-conditioned: then f32 rounding alone moves some
    # gradients by more than the bound. Measure both f32 results against float64.
    _, exact = recompute(torch.float64)
    torch_err, torch_name, _ = worst_error(grads, exact)
    ours_err, ours_name, _ = worst_error(ours, exact)
    print(f"against float64: torch f32 {torch_err:.2e} ({torch_name}), ours {ours_err:.2e} ({ours_name})")
    ok = worst_loss <= 1e-5 and ours_err <= max(1e-4, 2 * torch_err)
    print("PASS" if ok else "FAIL", f"(bn {args.bn}; ours no further from float64 than 2x torch's f32, or 1e-4)")
else:
    print("PASS" if ok else "FAIL", f"(bn {args.bn}; bounds: loss 1e-5, gradients 1e-4)")
sys.exit(0 if ok else 1)
