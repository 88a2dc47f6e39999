"""Reference: BYOL in PyTorch, written apart from our Rust code, to compare learning on one dataset.

A ResNet-18 with the small stem (3x3 conv, no max-pool) at a chosen width, two views with the
byol-small augmentations (torchvision), projector and predictor MLPs, EMA target (base momentum
rising to 1 on a cosine), two threads. Prints the weighted kNN top-1 (k 20, temperature 0.07,
features of the whole image resized to the view size) of the random backbone, after every epoch
(or four times with --steps) and, with --test, of the random and final backbones on test; the last
line is one JSON object with all of them.

Usage: python tools/byol_torch_reference.py DATA [options]
  DATA holds train/<class>/*, val/<class>/* (and test/<class>/* for --test): image files, as
  `loader synth --out DATA` or tools/fetch-real-data.sh write them.
The defaults are the demo's settings (AdamW 0.008 per 256, weight decay 1e-4, cosine rate, heads
512/128, quarter width, 32 px, batch 64); give --steps or --epochs. tools/compare.sh
(METHODS=torch-byol) passes the issue-22 recipe: --optimizer sgd --lr 0.1 --momentum 0.9
--weight-decay 1e-5 --schedule constant --hidden 1024 --epochs 5 --batch 128. Unlike ours, this
reference decays every parameter (PyTorch's SGD), biases and BatchNorm included. The backbone starts
as torchvision's ResNets do (--init pytorch: PyTorch's layer defaults, whose random backbone scores
lower on kNN, which inflates "gain over the random start").
"""
import argparse, copy, glob, json, math, os, time

import torch, torch.nn as nn, torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("data")
p.add_argument("--steps", type=int, help="training steps (kNN four times)")
p.add_argument("--epochs", type=int, help="epochs of len(train) // batch steps (kNN after each)")
p.add_argument("--lr", type=float, default=0.008, help="learning rate per 256 samples")
p.add_argument("--batch", type=int, default=64)
p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
p.add_argument("--weight-decay", type=float, default=1e-4)
p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
p.add_argument("--width", type=int, default=16, help="channels of the first stage (64 is full width)")
p.add_argument("--hidden", type=int, default=512, help="hidden width of projector and predictor")
p.add_argument("--dim", type=int, default=128, help="projection size")
p.add_argument("--size", type=int, default=32, help="view size in pixels")
p.add_argument("--ema", type=float, default=0.99, help="base EMA momentum (cosine to 1)")
p.add_argument("--init", choices=["torchvision", "pytorch"], default="torchvision",
               help="backbone initialisation: torchvision's ResNet (He-normal over fan-out, as ours and "
                    "solo-learn's) or PyTorch's layer defaults (what this reference used before 2026-12-03)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--test", action="store_true", help="also score the random and final backbones on test")
a = p.parse_args()
if (a.steps is None) == (a.epochs is None):
    p.error("give exactly one of --steps and --epochs")
torch.set_num_threads(2)
torch.manual_seed(a.seed)


def load(split):
    X, Y = [], []
    for ci, c in enumerate(sorted(os.listdir(f"{a.data}/{split}"))):
        for f in sorted(glob.glob(f"{a.data}/{split}/{c}/*")):
            X.append(Image.open(f).convert("RGB"))
            Y.append(ci)
    return X, torch.tensor(Y)


Xt, Yt = load("train")
Xv, Yv = load("val")
classes = int(Yt.max()) + 1
steps_per_epoch = len(Xt) // a.batch
steps = a.steps if a.steps is not None else a.epochs * steps_per_epoch
norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def aug(sol):
    return T.Compose([T.RandomResizedCrop(a.size, interpolation=T.InterpolationMode.BICUBIC), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                      T.RandomSolarize(128, p=sol), T.ToTensor(), norm])


a1, a2 = aug(0.0), aug(0.2)
plain = T.Compose([T.Resize(a.size), T.CenterCrop(a.size), T.ToTensor(), norm])


class Block(nn.Module):
    def __init__(s, i, o, st):
        super().__init__()
        s.c1 = nn.Conv2d(i, o, 3, st, 1, bias=False); s.b1 = nn.BatchNorm2d(o)
        s.c2 = nn.Conv2d(o, o, 3, 1, 1, bias=False); s.b2 = nn.BatchNorm2d(o)
        s.d = None if st == 1 and i == o else nn.Sequential(nn.Conv2d(i, o, 1, st, bias=False), nn.BatchNorm2d(o))

    def forward(s, x):
        y = F.relu(s.b1(s.c1(x))); y = s.b2(s.c2(y))
        return F.relu(y + (x if s.d is None else s.d(x)))


class Net(nn.Module):
    def __init__(s, w):
        super().__init__()
        s.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        L = []; c = w
        for i, o in enumerate([w, 2 * w, 4 * w, 8 * w]):
            L += [Block(c, o, 1 if i == 0 else 2), Block(o, o, 1)]; c = o
        s.layers = nn.Sequential(*L); s.dim = c

    def forward(s, x):
        return s.layers(s.stem(x)).mean((2, 3))


def mlp(i, h, o):
    return nn.Sequential(nn.Linear(i, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Linear(h, o))


net = Net(a.width)
if a.init == "torchvision":
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
proj = mlp(net.dim, a.hidden, a.dim); pred = mlp(a.dim, a.hidden, a.dim)
tnet, tproj = copy.deepcopy(net), copy.deepcopy(proj)
params = list(net.parameters()) + list(proj.parameters()) + list(pred.parameters())
base_lr = a.lr * a.batch / 256
if a.optimizer == "adamw":
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=a.weight_decay)
else:
    opt = torch.optim.SGD(params, lr=base_lr, momentum=a.momentum, weight_decay=a.weight_decay)


def features(X):
    with torch.no_grad():
        return F.normalize(torch.cat([net(torch.stack([plain(x) for x in X[i:i + 512]]))
                                      for i in range(0, len(X), 512)]), dim=1)


def knn(Xq, Yq):
    net.eval()
    ft, fq = features(Xt), features(Xq)
    net.train()
    s, i = (fq @ ft.T).topk(20, dim=1)
    votes = torch.zeros(len(Xq), classes).scatter_add_(1, Yt[i], (s / 0.07).exp())
    return round((votes.argmax(1) == Yq).float().mean().item() * 100, 2)


out = {"random_val": knn(Xv, Yv), "per_epoch": []}
print("random kNN", out["random_val"], flush=True)
if a.test:
    Xs, Ys = load("test")
    out["random_test"] = knn(Xs, Ys)
g = torch.Generator().manual_seed(a.seed)
t0 = time.time()
for step in range(steps):
    idx = torch.randint(len(Xt), (a.batch,), generator=g)
    v1 = torch.stack([a1(Xt[i]) for i in idx]); v2 = torch.stack([a2(Xt[i]) for i in idx])
    if a.schedule == "cosine":
        for gr in opt.param_groups:
            gr["lr"] = base_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
    o = pred(proj(net(torch.cat([v1, v2]))))
    with torch.no_grad():
        t = tproj(tnet(torch.cat([v2, v1])))
    loss = (2 - 2 * F.cosine_similarity(o, t, dim=1)).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    m = 1 - (1 - a.ema) * (math.cos(math.pi * step / steps) + 1) / 2
    with torch.no_grad():
        for x, y in zip(list(net.parameters()) + list(proj.parameters()), list(tnet.parameters()) + list(tproj.parameters())):
            y.mul_(m).add_((1 - m) * x)
        for x, y in zip(list(net.buffers()) + list(proj.buffers()), list(tnet.buffers()) + list(tproj.buffers())):
            y.copy_(x)
    due = (step + 1) % steps_per_epoch == 0 if a.epochs is not None else (step + 1) % max(1, steps // 4) == 0
    if due:
        top1 = knn(Xv, Yv)
        out["per_epoch"].append(top1)
        print(step + 1, round(loss.item(), 3), "kNN", top1, f"{time.time() - t0:.0f}s", flush=True)
out["final_val"] = out["per_epoch"][-1] if out["per_epoch"] else knn(Xv, Yv)
if a.test:
    out["final_test"] = knn(Xs, Ys)
print(json.dumps(out))
