"""Spanning-tree kernels of TEL and APro: MST, tree filter, affinity propagation.

Pure jax/numpy building blocks of the tree methods; the losses are assembled
in :mod:`agmm_jax.methods.tel` and :mod:`agmm_jax.methods.apro`.
Every kernel works on a batch (``B`` images of ``H x W`` pixels, ``N = H * W``
nodes, pixel ``n = row * W + col``), has fixed shapes, is jit-compatible and
computes in at least float32. The tree is a minimum spanning tree of the 4-connected pixel
grid, whose ``E = 2HW - H - W`` edges are indexed as in ``grid_edges``.

Reference details that these kernels reproduce:

TEL (megvii-research/TreeEnergyLoss, ``lib/loss/loss_helper.py``
TreeEnergyLoss, ``kernels/lib_tree_filter``):
  * Low-level tree: MST of the image in [0, 1] (raw RGB / 255, not
    mean/std-normalized), bilinearly resized to the prediction resolution, with
    edge cost the squared Euclidean distance summed over channels (+1, which
    does not change the tree). High-level tree: MST of the ``embed_feat``
    output of the network (a 1x1 conv + BN + ReLU head), same cost. The MSTs
    are built under no_grad.
  * The tree is rooted at pixel 0 (BFS); each non-root node carries the weight
    of the edge to its parent, recomputed from the embedding:
    ``w = exp(-||f_node - f_parent||^2 / sigma)`` at the low level, with sigma
    0.02 (VOC) or 0.002 (Cityscapes, ADE20k), and ``w = exp(-||.||^2)``
    (sigma 1) at the high level.
  * Filter: ``AS = (S p) / (S 1)`` with ``S_ij`` the product of the weights on
    the tree path (``tree_filter``), applied to ``p = softmax(logits)`` with
    the low tree, then to the result with the high tree.
  * Gradients: into the filtered values at both levels (AS is NOT detached),
    into the edge weights (hence the embedding) only at the high level; the
    image weights get none.
  * Loss: ``weight * sum(U * |p - AS|) / N_U`` with ``U`` the unlabeled-pixel
    mask (nearest-resized to the prediction, padding excluded), summed over
    classes and pixels, ``N_U`` the number of unlabeled pixels (not times the
    classes), no division when ``N_U = 0``; weight 0.4, all at the logit
    (stride 8) resolution.

APro (CircleRadon/APro, ``apro/apro.py``, ``apro/gp_cuda``, heads in
``mmdet/models/dense_heads``):
  * MST of the mean/std-normalized image at the mask resolution, same cost as
    TEL. Global propagation edge weight: ``d = ||e_u - e_v||^2`` of the
    embedding at the tree edge (no +1); affinity of a pair
    ``A_ij = exp(-max_{e in path(i, j)} d_e / zeta^2)``; output
    ``y_i = (sum_{j != i} A_ij p_j + p_i) / (sum_{j != i} A_ij + 1)``
    (``global_propagation``). Applied twice on the same image tree: first
    with the image as embedding and ``zeta_gl``, then with the first output
    as both values and embedding and ``zeta_gh``; defaults 0.01 / 0.07
    (BoxSOLOv2, Box2Mask head), configs use 0.01 / 0.07 (SOLOv2) and
    0.02-0.03 / 0.03 (Box2Mask).
  * Local propagation: 5x5 window, dilation 1, ``zeta_s = 0.15``, 20
    iterations, affinity ``exp(-sum_c (I_j - I_i)^2 / zeta_s^2)`` on the
    normalized image, the centre included, out-of-image neighbours excluded;
    ``x <- (sum_j a_ij x_j) / sum_j a_ij``, multiplied by the box mask before
    the first and after every iteration (``local_propagation``).
  * Both pseudo-labels are detached (no backward in the CUDA op, no_grad for
    the local one). Losses, ``m = sigmoid(mask logits)``, ``b`` the box mask:
    ``L_global = sum(b * |y_global - m|) / sum(b)`` (x2 and per instance in
    BoxSOLOv2), ``L_local = sum(b * |m - y_local|) / sum(b)``.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Directions of the 4 grid neighbours; the opposite of ``d`` is ``3 - d``.
_UP, _LEFT, _RIGHT, _DOWN = 0, 1, 2, 3


class SpanningTree(NamedTuple):
  """A spanning tree of each image's pixel grid, rooted at pixel 0.

  Attributes:
    edge_mask: bool ``[B, E]``: the ``N - 1`` grid edges of the tree, indexed
      as in ``grid_edges``.
    parent: int32 ``[B, N]``: the parent of each pixel; the root is its own.
    order: int32 ``[B, N]``: the pixels in depth-first preorder (``order[0]``
      is the root, every parent precedes its children).
    depth: int32 ``[B, N]``: number of edges between each pixel and the root.
  """
  edge_mask: jax.Array
  parent: jax.Array
  order: jax.Array
  depth: jax.Array


def _ceil_log2(n: int) -> int:
  """Smallest ``k >= 0`` with ``2^k >= n``."""
  return max(0, (n - 1).bit_length())


def grid_edges(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """The edges of the 4-connected ``height x width`` grid.

  Vertical edges come first (``e = r * W + c`` joins ``(r, c)`` and
  ``(r + 1, c)``), then horizontal ones (``e = (H - 1) W + r (W - 1) + c``
  joins ``(r, c)`` and ``(r, c + 1)``), the order of the TEL/APro code.

  Returns:
    ``(src, dst)``, int32 ``[E]`` each, ``E = 2HW - H - W``, ``src < dst``.
  """
  ids = np.arange(height * width, dtype=np.int32).reshape(height, width)
  src = np.concatenate([ids[:-1, :].ravel(), ids[:, :-1].ravel()])
  dst = np.concatenate([ids[1:, :].ravel(), ids[:, 1:].ravel()])
  return src, dst


def _boruvka(weights: jax.Array, src: np.ndarray, dst: np.ndarray,
             num_nodes: int) -> jax.Array:
  """Edge mask ``[E]`` of the MST of one connected graph (Borůvka)."""
  num_edges = weights.shape[0]
  if num_edges == 0:  # a single pixel
    return jnp.zeros(0, dtype=bool)
  edge_ids = jnp.arange(num_edges, dtype=jnp.int32)
  node_ids = jnp.arange(num_nodes, dtype=jnp.int32)
  num_rounds = _ceil_log2(num_nodes)

  def one_round(_, state):
    comp, selected = state
    comp_u, comp_v = comp[src], comp[dst]
    outgoing = comp_u != comp_v
    masked = jnp.where(outgoing, weights, jnp.inf)
    min_w = jnp.full(num_nodes, jnp.inf, weights.dtype)
    min_w = min_w.at[comp_u].min(masked).at[comp_v].min(masked)
    # Ties go to the lowest edge index: edges are then totally ordered by
    # (weight, index), so the chosen edges form a forest (up to one edge picked
    # by both of its components).
    cand_u = jnp.where(outgoing & (weights == min_w[comp_u]), edge_ids, num_edges)
    cand_v = jnp.where(outgoing & (weights == min_w[comp_v]), edge_ids, num_edges)
    best = jnp.full(num_nodes, num_edges, jnp.int32)
    best = best.at[comp_u].min(cand_u).at[comp_v].min(cand_v)
    selected = selected.at[best].set(True, mode='drop')
    # Hook each component onto the one across its chosen edge; a pair that
    # chose the same edge points at each other and the lower label stays root.
    edge = jnp.minimum(best, num_edges - 1)
    other = jnp.where(comp_u[edge] == node_ids, comp_v[edge], comp_u[edge])
    pointer = jnp.where(best < num_edges, other, node_ids)
    mutual = (pointer[pointer] == node_ids) & (node_ids < pointer)
    pointer = jnp.where(mutual, node_ids, pointer)
    # A hooking chain is at most N long: ceil(log2 N) doublings reach its root.
    pointer = lax.fori_loop(0, num_rounds, lambda _, q: q[q], pointer)
    return pointer[comp], selected

  # Each round at least halves the number of components.
  _, selected = lax.fori_loop(
      0, num_rounds, one_round,
      (node_ids, jnp.zeros(num_edges, dtype=bool)))
  return selected


def _root_tree(edge_mask: jax.Array, height: int, width: int
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(parent, order, depth)`` of one grid tree rooted at pixel 0.

  Euler tour technique: the tree's ``2(N - 1)`` directed arcs are chained by
  "leave the head by its next tree edge, cyclically after the one we came in
  by", which walks around the tree from the root; list ranking by pointer
  jumping gives each arc its tour position, an arc is a parent-to-child arc
  when it precedes its reverse, and prefix sums over the tour give depth and
  preorder.
  """
  num_nodes = height * width
  if num_nodes == 1:
    zero = jnp.zeros(1, jnp.int32)
    return zero, zero, zero
  num_vertical = (height - 1) * width
  ids = np.arange(num_nodes, dtype=np.int32).reshape(height, width)
  top, left = ids[:-1, :].ravel(), ids[:, :-1].ravel()
  vertical, horizontal = edge_mask[:num_vertical], edge_mask[num_vertical:]
  has = jnp.zeros((num_nodes, 4), dtype=bool)
  has = has.at[top, _DOWN].set(vertical).at[top + width, _UP].set(vertical)
  has = has.at[left, _RIGHT].set(horizontal).at[left + 1, _LEFT].set(horizontal)

  # Arc a = 4 n + d leaves node n in direction d.
  num_arcs = 4 * num_nodes
  arc_ids = np.arange(num_arcs, dtype=np.int32)
  arc_node, arc_dir = arc_ids // 4, arc_ids % 4
  offsets = np.array([-width, -1, 1, width], dtype=np.int32)
  head = np.clip(arc_node + offsets[arc_dir], 0, num_nodes - 1)
  back_dir = 3 - arc_dir
  valid = has.reshape(-1)
  next_dir = jnp.asarray(back_dir)  # a leaf sends the walk straight back
  for k in (3, 2, 1):
    candidate = (back_dir + k) % 4
    next_dir = jnp.where(has[head, candidate], candidate, next_dir)
  successor = 4 * head + next_dir
  first_arc = jnp.argmax(has[0]).astype(jnp.int32)  # root = pixel 0
  linked = valid & (successor != first_arc)  # the last arc ends the tour
  pointer = jnp.where(linked, successor, arc_ids)
  distance = linked.astype(jnp.int32)
  tour_length = 2 * (num_nodes - 1)

  def jump(_, state):
    dist, ptr = state
    return dist + dist[ptr], ptr[ptr]

  distance, _ = lax.fori_loop(0, _ceil_log2(tour_length), jump,
                              (distance, pointer))
  position = tour_length - 1 - distance
  reverse = 4 * head + back_dir
  downward = valid & (position < position[reverse])

  child = jnp.where(downward, head, num_nodes)  # num_nodes: dropped
  parent = jnp.zeros(num_nodes, jnp.int32).at[child].set(arc_node, mode='drop')
  entry = jnp.zeros(num_nodes, jnp.int32).at[child].set(position, mode='drop')
  step = jnp.zeros(tour_length, jnp.int32).at[
      jnp.where(valid, position, tour_length)].set(
          jnp.where(downward, 1, -1), mode='drop')
  is_root = jnp.arange(num_nodes) == 0
  depth = jnp.where(is_root, 0, jnp.cumsum(step)[entry])
  preorder = jnp.where(is_root, 0, jnp.cumsum(step > 0)[entry])
  order = jnp.zeros(num_nodes, jnp.int32).at[preorder].set(
      jnp.arange(num_nodes, dtype=jnp.int32))
  return parent, order, depth.astype(jnp.int32)


def minimum_spanning_tree(vectors: jax.Array) -> SpanningTree:
  """Minimum spanning tree of each image's 4-connected pixel grid.

  Edge cost ``c_uv = ||x_u - x_v||^2`` (summed over the ``D`` channels), ties
  broken by the lower edge index, so the tree is the unique MST under the
  order (cost, index). Borůvka's algorithm: ``ceil(log2 N)`` rounds, in each
  of which every component picks its cheapest outgoing edge (segment-min over
  component ids) and the components are merged by pointer jumping. The tree is
  then rooted at pixel 0 by an Euler tour (``_root_tree``). No gradient
  flows (the outputs are discrete).

  Cost per image: ``O(E log N)`` for the rounds plus ``O(N log^2 N)`` for the
  pointer jumping, ``O(N log N)`` for the rooting (list ranking over the ``4N``
  arc slots); ``O(log^2 N)`` sequential steps. Memory ``O(N)``.

  Args:
    vectors: ``[B, H, W, D]`` float, finite.

  Returns:
    A ``SpanningTree`` with leading batch dimension ``B``.
  """
  _, height, width, channels = vectors.shape
  num_nodes = height * width
  src, dst = grid_edges(height, width)

  def one_image(x):
    x = x.reshape(num_nodes, channels).astype(
        jnp.promote_types(x.dtype, jnp.float32))
    weights = jnp.sum(jnp.square(x[src] - x[dst]), axis=-1)
    edge_mask = _boruvka(weights, src, dst, num_nodes)
    return (edge_mask,) + _root_tree(edge_mask, height, width)

  return SpanningTree(*jax.vmap(one_image)(vectors))


def _as_nodes(values: jax.Array, num_nodes: int) -> jax.Array:
  """``[B, H, W, C]`` or ``[B, N, C]`` as ``[B, N, C]``."""
  return values.reshape(values.shape[0], num_nodes, values.shape[-1])


def parent_sq_distances(embedding: jax.Array, tree: SpanningTree) -> jax.Array:
  """Squared distance of each pixel's embedding to its parent's.

  ``d_n = ||f_n - f_parent(n)||^2``, 0 at the root; differentiable in
  ``embedding``. TEL's edge weights are ``exp(-d / sigma)``; APro's global
  propagation takes ``d`` itself. Cost ``O(N D)``.

  Args:
    embedding: ``[B, H, W, D]`` or ``[B, N, D]``.
    tree: the ``SpanningTree`` of the same images.

  Returns:
    ``[B, N]``, the dtype of ``embedding``.
  """
  f = _as_nodes(embedding, tree.parent.shape[1])
  f_parent = jnp.take_along_axis(f, tree.parent[..., None], axis=1)
  return jnp.sum(jnp.square(f - f_parent), axis=-1)


def _tree_passes(values, weights, order, parent):
  """Leaves-to-root then root-to-leaves passes over one tree.

  ``up_i = v_i + sum_{children c} w_c up_c`` (reverse preorder), then
  ``down_root = up_root`` and ``down_c = (1 - w_c^2) up_c + w_c down_p``
  (preorder), so ``down_i = sum_j S_ij v_j``. ``N - 1`` sequential steps each.
  """

  def up_step(up, node):
    return up.at[parent[node]].add(weights[node] * up[node]), None

  def down_step(down, node):
    w = weights[node]
    return down.at[node].set((1 - w * w) * down[node] + w * down[parent[node]]), None

  up, _ = lax.scan(up_step, values, order[:0:-1])
  down, _ = lax.scan(down_step, up, order[1:])
  return up, down


@jax.custom_vjp
def _path_product_sum(values, weights, order, parent):
  """``sum_j S_ij v_j`` on one tree: ``[N, C]``."""
  return _tree_passes(values, weights, order, parent)[1]


def _path_product_sum_fwd(values, weights, order, parent):
  up, down = _tree_passes(values, weights, order, parent)
  return down, (weights, order, parent, up, down)


def _path_product_sum_bwd(residuals, grad):
  # S is symmetric, so the values' cotangent is the same filter of the output
  # cotangent g. For the edge (c, p = parent(c)), dS_ij / dw_c = S_ij / w_c for
  # the pairs it separates; summing over i in subtree(c) and j outside gives
  # up^g_c . (down^v_p - w_c up^v_c), plus the same with g and v swapped.
  weights, order, parent, up, down = residuals
  grad_up, grad_down = _tree_passes(grad, weights, order, parent)
  w = weights[:, None]
  grad_weights = jnp.sum(grad_up * (down[parent] - w * up)
                         + up * (grad_down[parent] - w * grad_up), axis=-1)
  grad_weights = grad_weights.at[order[0]].set(0)  # the root has no edge
  return grad_down, grad_weights, None, None


_path_product_sum.defvjp(_path_product_sum_fwd, _path_product_sum_bwd)


def tree_filter(values: jax.Array, tree: SpanningTree,
                edge_weights: jax.Array) -> jax.Array:
  """TEL's normalized tree filter.

  ``out_i = sum_j S_ij v_j / sum_j S_ij`` with ``S_ij`` the product of the
  edge weights on the tree path between ``i`` and ``j`` (``S_ii = 1``),
  computed for the values and a ones channel together by one leaves-to-root and
  one root-to-leaves pass. Differentiable in ``values`` and ``edge_weights``
  (hand-written VJP: two more passes over the output cotangent, and ``O(NC)``
  memory instead of what autodiff through the scans would keep).

  Cost per image: ``2 (N - 1)`` sequential steps of ``O(C)`` work forward,
  as many backward; memory ``O(N C)``.

  Args:
    values: ``[B, N, C]`` or ``[B, H, W, C]`` float.
    tree: a ``SpanningTree`` of ``N`` pixels.
    edge_weights: ``[B, N]`` in ``[0, 1]``: the weight of the edge between each
      pixel and its parent (for TEL ``exp(-parent_sq_distances(f) / sigma)``);
      the root's entry is ignored and gets a zero gradient.

  Returns:
    The filtered values, shape and dtype of ``values``.
  """
  num_nodes = tree.parent.shape[1]
  dtype = jnp.promote_types(values.dtype, jnp.float32)
  v = _as_nodes(values, num_nodes).astype(dtype)
  ones = jnp.ones(v.shape[:-1] + (1,), dtype)
  total = jax.vmap(_path_product_sum)(
      jnp.concatenate([v, ones], axis=-1), edge_weights.astype(dtype),
      tree.order, tree.parent)
  # The normalizer is at least S_ii = 1.
  out = total[..., :-1] / total[..., -1:]
  return out.reshape(values.shape).astype(values.dtype)


def _jump_sums(values: jax.Array, pointer: jax.Array, rounds: int) -> jax.Array:
  """Sums of ``values`` along pointer chains, by pointer jumping.

  ``out_x = sum_{k >= 0} values[pointer^k(x)]`` for a forest whose roots point
  at themselves and hold 0; ``rounds`` doublings reach chains of up to
  ``2^rounds`` nodes. Every addition is of terms of the final sum, so nothing
  cancels. Cost ``O(rounds * size(values))``.
  """
  for _ in range(rounds):
    values, pointer = values + values[pointer], pointer[pointer]
  return values


def _kruskal_merges(edges: jax.Array, parent: jax.Array
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The Kruskal reconstruction tree (KRT) of each image's tree.

  Merges the tree edges in the order given, in a union-find by size (at most
  ``floor(log2 N)`` deep, so ``find`` is that many unrolled lookups). Merge
  ``t`` creates the KRT node ``N + t`` (leaves ``0 .. N - 1`` are the pixels)
  with the KRT roots of the two merged components as children.

  The batch shares one union-find over ``B N`` flat ids, updated at ``B``
  positions per step: the state is three int32 vectors updated in place
  (a ``vmap`` of this scan did not finish compiling on XLA:CPU within two
  minutes at batch 4, 40 x 40).

  Args:
    edges: int32 ``[B, N - 1]``: the tree edges in merge order, each as the
      pixel whose edge to its ``parent`` it is.
    parent: int32 ``[B, N]``.

  Returns:
    ``(first, second, size_first, size_second)``, int32 ``[B, N - 1]``: the
    children of KRT node ``N + t`` (KRT ids within the image) and their leaf
    counts. Cost: ``N - 1`` sequential steps of ``O(B log N)``.
  """
  batch, num_edges = edges.shape
  num_nodes = num_edges + 1
  base = jnp.arange(batch, dtype=jnp.int32)[:, None] * num_nodes
  parent = (parent + base).reshape(-1)
  max_depth = num_nodes.bit_length() - 1

  def find(fa, x):
    for _ in range(max_depth):
      x = fa[x]
    return x

  def merge(state, step):
    fa, size, krt = state  # krt: the KRT root of each union-find root
    edge, new = step
    root_u, root_v = find(fa, edge), find(fa, parent[edge])
    size_u, size_v = size[root_u], size[root_v]
    big = jnp.where(size_u >= size_v, root_u, root_v)
    small = root_u + root_v - big
    out = (krt[root_u], krt[root_v], size_u, size_v)
    fa = fa.at[small].set(big, unique_indices=True)
    size = size.at[big].set(size_u + size_v, unique_indices=True)
    krt = krt.at[big].set(new, unique_indices=True)
    return (fa, size, krt), out

  flat = jnp.arange(batch * num_nodes, dtype=jnp.int32)
  internal = jnp.arange(num_nodes, 2 * num_nodes - 1, dtype=jnp.int32)
  _, merges = lax.scan(
      merge, (flat, jnp.ones_like(flat), flat % num_nodes),
      ((edges + base).T,
       jnp.broadcast_to(internal[:, None], (num_edges, batch))))
  return tuple(m.T for m in merges)


def _propagate_on_krt(values, affinity, first, second, size_first,
                      size_second):
  """``(sum_{j != i} A_ij p_j + p_i) / (sum_{j != i} A_ij + 1)`` of one image
  from its KRT (``_kruskal_merges``) and the merges' affinities ``[N - 1]``."""
  num_nodes, channels = values.shape
  dtype = values.dtype
  num_krt = 2 * num_nodes - 1
  root = num_krt - 1
  internal = jnp.arange(num_nodes, num_krt, dtype=jnp.int32)
  krt_parent = jnp.full(num_krt, root, jnp.int32).at[first].set(
      internal).at[second].set(internal)
  sibling = jnp.full(num_krt, root, jnp.int32).at[first].set(
      second).at[second].set(first)
  count = jnp.concatenate([jnp.ones(num_nodes, jnp.int32),
                           size_first + size_second])
  rounds = _ceil_log2(num_nodes)  # the KRT is at most N - 1 deep
  # Depth-first leaf order, first child first: every KRT node's leaves are the
  # positions [start, start + count), start = the leaves of the first
  # children to the left of its path to the root.
  start = _jump_sums(jnp.zeros(num_krt, jnp.int32).at[second].set(size_first),
                     krt_parent, rounds)
  leaf_at = jnp.zeros(num_nodes, jnp.int32).at[start[:num_nodes]].set(
      jnp.arange(num_nodes, dtype=jnp.int32))
  # S(x) = sum of [p, 1] over x's leaves, as the aligned blocks of
  # 2^k positions given by the bits of count (block_k[i] = sum of
  # positions i .. i + 2^k - 1): sums of terms, not differences of prefix sums
  # (those cancel to an error of about eps * N * max p in float32).
  block = jnp.concatenate([values, jnp.ones((num_nodes, 1), dtype)],
                          axis=-1)[leaf_at]
  sums = jnp.zeros((num_krt, channels + 1), dtype)
  position = start
  for k in range(_ceil_log2(num_nodes + 1)):
    take = (count >> k) & 1
    sums = sums + jnp.where(take[:, None] == 1, block[position], 0)
    position = position + (take << k)
    shift = min(1 << k, num_nodes)
    block = block + jnp.concatenate(
        [block[shift:], jnp.zeros((shift, channels + 1), dtype)])
  # Leaf i gains exp(-w_a / zeta^2) S(sibling) at each KRT node a on its path,
  # from the child of a it lies under: gain(x) for each non-root x, summed
  # down the paths.
  parent_affinity = jnp.append(affinity, 0)[krt_parent - num_nodes]
  gain = (parent_affinity[:, None] * sums[sibling]).at[root].set(0)
  total = _jump_sums(gain, krt_parent, rounds)[:num_nodes]
  return (total[:, :-1] + values) / (total[:, -1:] + 1)


def global_propagation(values: jax.Array, tree: SpanningTree,
                       distances: jax.Array, zeta: float) -> jax.Array:
  """APro's global affinity propagation over a spanning tree.

  ``y_i = (sum_{j != i} A_ij p_j + p_i) / (sum_{j != i} A_ij + 1)`` with
  ``A_ij = exp(-max_{e in path(i, j)} d_e / zeta^2)`` (Algorithm 1 of APro).
  Merging the tree edges in ascending ``d`` (Kruskal order) builds the
  Kruskal reconstruction tree (KRT): the pixels are its leaves, merge ``t``
  of the components ``a`` and ``b`` over edge ``e`` is an internal node of
  weight ``d_e`` with children the KRT nodes of ``a`` and ``b``. Pixels ``i``
  and ``j`` first share a component when the largest edge of their path is
  merged, so ``max_{path(i, j)} d = d`` of their lowest common KRT ancestor,
  and ``sum_{j != i} A_ij [p_j, 1] = sum_{a} exp(-d_a / zeta^2) S(sibling)``
  over the KRT ancestors ``a`` of leaf ``i``, with ``S(x)`` the sum of
  ``[p, 1]`` over the leaves under ``x`` and ``sibling`` the child of ``a``
  that does not hold ``i``. The merges are a scan with int32 state only
  (``_kruskal_merges``); the rest is parallel: KRT leaves in depth-first order
  (each subtree a range of positions) by pointer jumping, ``S`` as sums of
  power-of-two blocks of that order, and the sums over ancestors by pointer
  jumping, so every float sum adds nonnegative terms for nonnegative ``p``.
  Detached (APro's pseudo-label has no gradient).

  Cost per image: sort ``O(N log N)``; ``N - 1`` sequential merges of
  ``O(log N)`` scalar work (the batch together); ``O(N C log N)`` parallel
  work in ``O(log N)`` steps. Memory ``O(N C)``.

  Args:
    values: ``[B, N, C]`` or ``[B, H, W, C]`` float, the ``p`` (APro: mask
      probabilities, one channel per instance).
    tree: a ``SpanningTree`` of ``N`` pixels.
    distances: ``[B, N]``: ``d`` of the edge between each pixel and its parent,
      e.g. ``parent_sq_distances(embedding, tree)``; the root's entry is
      ignored.
    zeta: the bandwidth (APro: 0.01 with the image, 0.07 with the first pass's
      output as embedding).

  Returns:
    ``y``, shape and dtype of ``values``.
  """
  num_nodes = tree.parent.shape[1]
  dtype = jnp.promote_types(values.dtype, jnp.float32)
  p = lax.stop_gradient(_as_nodes(values, num_nodes)).astype(dtype)
  d = lax.stop_gradient(distances).astype(dtype)
  # The root's slot holds no edge: +inf sorts it last, out of the merges.
  d = jnp.where(jnp.arange(num_nodes) == tree.order[:, :1], jnp.inf, d)
  edges = jnp.argsort(d, axis=1)[:, :num_nodes - 1].astype(jnp.int32)
  affinity = jnp.exp(-jnp.take_along_axis(d, edges, axis=1) / zeta**2)
  out = jax.vmap(_propagate_on_krt)(
      p, affinity, *_kruskal_merges(edges, tree.parent))
  return out.reshape(values.shape).astype(values.dtype)


def local_propagation(values: jax.Array, image: jax.Array,
                      zeta_s: float = 0.15, radius: int = 2,
                      num_iter: int = 20, mask: jax.Array | None = None
                      ) -> jax.Array:
  """APro's local affinity propagation.

  With the window ``W_i`` of the ``(2r + 1)^2`` in-image pixels around ``i``
  (``i`` included) and ``a_ij = exp(-||I_i - I_j||^2 / zeta_s^2)``, iterates
  ``x_i <- m_i * sum_{j in W_i} a_ij x_j / sum_{j in W_i} a_ij`` ``num_iter``
  times from ``x = m * values`` (``m`` the mask, 1 if None). Out-of-image
  neighbours are dropped (APro pads with zeros after offsetting the image by
  10, which gives them affinity 0). Shifted slices, no ``N x N``; detached.

  Cost: ``O(num_iter (2r + 1)^2 B H W C)``; memory ``O((2r + 1)^2 B H W)``.

  Args:
    values: ``[B, H, W, C]`` float.
    image: ``[B, H, W, D]`` float (APro: the mean/std-normalized image).
    zeta_s: affinity bandwidth.
    radius: window radius ``r`` (APro: kernel size 5, ``r = 2``).
    num_iter: iterations.
    mask: optional ``[B, H, W]`` multiplier (APro: the box mask).

  Returns:
    ``[B, H, W, C]``, the dtype of ``values``.
  """
  batch, height, width, _ = values.shape
  size = 2 * radius + 1
  x = lax.stop_gradient(values).astype(
      jnp.promote_types(values.dtype, jnp.float32))
  image = lax.stop_gradient(image).astype(x.dtype)
  pad = ((0, 0), (radius, radius), (radius, radius))
  padded_image = jnp.pad(image, pad + ((0, 0),))
  inside = jnp.pad(jnp.ones((batch, height, width), x.dtype), pad)

  def window(a, dy, dx):
    return a[:, dy:dy + height, dx:dx + width]

  offsets = [(dy, dx) for dy in range(size) for dx in range(size)]
  affinity = jnp.stack([
      window(inside, dy, dx) * jnp.exp(-jnp.sum(
          jnp.square(window(padded_image, dy, dx) - image), axis=-1) / zeta_s**2)
      for dy, dx in offsets])
  # The centre term makes every normalizer >= 1.
  affinity = (affinity / jnp.sum(affinity, axis=0))[..., None]
  m = (jnp.ones((batch, height, width), x.dtype) if mask is None
       else lax.stop_gradient(mask).astype(x.dtype))[..., None]

  def iterate(_, x):
    padded = jnp.pad(x, pad + ((0, 0),))
    out = sum(affinity[k] * window(padded, dy, dx)
              for k, (dy, dx) in enumerate(offsets))
    return out * m

  return lax.fori_loop(0, num_iter, iterate, x * m).astype(values.dtype)
