"""Tests of agmm_jax.methods.spanning_tree against independent references.

References: scipy's MST and connected components for the tree, dense all-pairs
sums over paths found by a plain BFS for the filters, a per-pixel loop for the
local propagation, finite differences for the gradients.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import sparse
from scipy.sparse import csgraph

from agmm_jax.methods import spanning_tree as st

_mst = jax.jit(st.minimum_spanning_tree)
_tree_filter = jax.jit(st.tree_filter)
_parent_sq_distances = jax.jit(st.parent_sq_distances)
_global = jax.jit(st.global_propagation, static_argnames='zeta')
_local = jax.jit(st.local_propagation,
                 static_argnames=('zeta_s', 'radius', 'num_iter'))


def _grid_edge_list(height, width):
  """The grid edges in the documented order: vertical ones, then horizontal."""
  vertical = [(r * width + c, (r + 1) * width + c)
              for r in range(height - 1) for c in range(width)]
  horizontal = [(r * width + c, r * width + c + 1)
                for r in range(height) for c in range(width - 1)]
  return vertical + horizontal


def _tree_edges(tree, b):
  """The tree's undirected edges of image ``b`` as a set of sorted pairs."""
  num_nodes = tree.parent.shape[1]
  parent = np.asarray(tree.parent[b])
  return {tuple(sorted((n, int(parent[n])))) for n in range(num_nodes)
          if n != 0}


def _path_stats(edges, num_nodes, edge_value, combine, start):
  """``[N, N]`` fold of ``edge_value`` over every tree path, by BFS per node."""
  adjacency = collections.defaultdict(list)
  for u, v in edges:
    adjacency[u].append(v)
    adjacency[v].append(u)
  out = np.zeros((num_nodes, num_nodes))
  for i in range(num_nodes):
    out[i, i] = start
    seen = {i}
    queue = collections.deque([i])
    while queue:
      u = queue.popleft()
      for v in adjacency[u]:
        if v not in seen:
          seen.add(v)
          out[i, v] = combine(out[i, u], edge_value[tuple(sorted((u, v)))])
          queue.append(v)
    assert len(seen) == num_nodes
  return out


def _random_tree(rng, batch, height, width, channels=3):
  vectors = rng.normal(size=(batch, height, width, channels))
  return vectors, _mst(vectors)


@pytest.mark.parametrize('height,width,channels,integer', [
    (12, 12, 3, False), (7, 9, 1, True), (3, 5, 2, True), (1, 8, 1, True),
    (8, 1, 2, False), (1, 1, 1, False)])
def test_mst_is_minimum_spanning_tree(height, width, channels, integer):
  rng = np.random.default_rng(height * 100 + width)
  shape = (2, height, width, channels)
  # Few distinct integer values give many equal edge costs.
  vectors = (rng.integers(0, 3, shape) if integer
             else rng.normal(size=shape)).astype(np.float32)
  tree = _mst(vectors)
  num_nodes = height * width
  edges = _grid_edge_list(height, width)
  assert tree.edge_mask.shape == (2, len(edges))
  for b in range(2):
    x = vectors[b].reshape(num_nodes, channels).astype(np.float64)
    cost = {e: float(np.sum((x[e[0]] - x[e[1]])**2)) for e in edges}
    mask = np.asarray(tree.edge_mask[b])
    chosen = [e for e, m in zip(edges, mask) if m]
    assert len(chosen) == num_nodes - 1
    if num_nodes > 1:
      rows, cols = np.array(chosen).T
      graph = sparse.coo_matrix((np.ones(len(chosen)), (rows, cols)),
                                shape=(num_nodes, num_nodes))
      assert csgraph.connected_components(graph, directed=False)[0] == 1
      # scipy drops zero entries: shift every cost by 1 (as TEL does).
      rows, cols = np.array(edges).T
      full = sparse.coo_matrix(
          ([cost[e] + 1 for e in edges], (rows, cols)),
          shape=(num_nodes, num_nodes)).tocsr()
      expected = csgraph.minimum_spanning_tree(full).sum() - (num_nodes - 1)
      np.testing.assert_allclose(sum(cost[e] for e in chosen), expected,
                                 rtol=1e-5, atol=1e-5)
    # The rooted representation describes the same tree.
    assert _tree_edges(tree, b) == set(chosen)
    parent = np.asarray(tree.parent[b])
    order = np.asarray(tree.order[b])
    depth = np.asarray(tree.depth[b])
    assert parent[0] == 0 and order[0] == 0 and depth[0] == 0
    assert sorted(order) == list(range(num_nodes))
    rank = np.argsort(order)
    for n in range(1, num_nodes):
      assert rank[parent[n]] < rank[n]
      assert depth[n] == depth[parent[n]] + 1


def test_parent_sq_distances():
  rng = np.random.default_rng(1)
  vectors, tree = _random_tree(rng, 2, 3, 5)
  embedding = rng.normal(size=(2, 15, 4)).astype(np.float32)
  got = np.asarray(_parent_sq_distances(embedding, tree))
  parent = np.asarray(tree.parent)
  for b in range(2):
    for n in range(15):
      np.testing.assert_allclose(
          got[b, n], np.sum((embedding[b, n] - embedding[b, parent[b, n]])**2),
          rtol=1e-5)
  assert np.all(got[:, 0] == 0)


def _brute_tree_filter(values, tree, weights, b):
  num_nodes = values.shape[1]
  parent = np.asarray(tree.parent[b])
  edge_weight = {tuple(sorted((n, int(parent[n])))): weights[b, n]
                 for n in range(1, num_nodes)}
  s = _path_stats(_tree_edges(tree, b), num_nodes, edge_weight,
                  lambda acc, w: acc * w, 1.0)
  return (s @ values[b]) / s.sum(1, keepdims=True)


@pytest.mark.parametrize('height,width', [(3, 4), (1, 6), (5, 1)])
def test_tree_filter_matches_all_pairs(height, width):
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    _, tree = _random_tree(rng, 2, height, width)
    num_nodes = height * width
    values = rng.normal(size=(2, num_nodes, 3))
    weights = rng.uniform(0.1, 1.0, size=(2, num_nodes))
    got = np.asarray(_tree_filter(values, tree, weights))
    for b in range(2):
      np.testing.assert_allclose(
          got[b], _brute_tree_filter(values, tree, weights, b), rtol=1e-10)
    # The [B, H, W, C] layout gives the same.
    grid = np.asarray(_tree_filter(values.reshape(2, height, width, 3), tree,
                                   weights))
    np.testing.assert_allclose(grid.reshape(got.shape), got, rtol=1e-12)


def test_tree_filter_gradients_match_finite_differences():
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    _, tree = _random_tree(rng, 2, 3, 4)  # the shapes compiled above
    values = rng.normal(size=(2, 12, 2))
    weights = rng.uniform(0.2, 1.0, size=(2, 12))
    cotangent = rng.normal(size=(2, 12, 2))

    @jax.jit
    def loss(v, w):
      return jnp.sum(cotangent * st.tree_filter(v, tree, w))

    grad_v, grad_w = jax.grad(loss, argnums=(0, 1))(values, weights)
    eps = 1e-6

    def finite_difference(x, f):
      grad = np.zeros_like(x)
      for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = eps
        grad[idx] = (f(x + step) - f(x - step)) / (2 * eps)
      return grad

    np.testing.assert_allclose(
        grad_v, finite_difference(values, lambda v: loss(v, weights)),
        rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(
        grad_w, finite_difference(weights, lambda w: loss(values, w)),
        rtol=1e-6, atol=1e-8)
    assert np.all(grad_w[:, 0] == 0)  # the root's slot holds no edge


def _brute_global(values, tree, distances, zeta, b):
  num_nodes = values.shape[1]
  parent = np.asarray(tree.parent[b])
  edge_distance = {tuple(sorted((n, int(parent[n])))): distances[b, n]
                   for n in range(1, num_nodes)}
  path_max = _path_stats(_tree_edges(tree, b), num_nodes, edge_distance, max,
                         -np.inf)
  affinity = np.exp(-path_max / zeta**2)
  np.fill_diagonal(affinity, 0)
  return ((affinity @ values[b] + values[b])
          / (affinity.sum(1, keepdims=True) + 1))


@pytest.mark.parametrize('height,width,ties', [
    (3, 4, False), (3, 4, True), (1, 6, True), (5, 1, False), (9, 11, True),
    (1, 1, False)])
def test_global_propagation_matches_all_pairs(height, width, ties):
  with jax.enable_x64(True):
    rng = np.random.default_rng(4)
    _, tree = _random_tree(rng, 2, height, width)
    num_nodes = height * width
    values = rng.uniform(size=(2, num_nodes, 2))
    distances = (rng.integers(0, 3, size=(2, num_nodes)) * 0.5 if ties
                 else rng.uniform(size=(2, num_nodes)))
    got = np.asarray(_global(values, tree, distances, zeta=0.7))
    for b in range(2):
      np.testing.assert_allclose(
          got[b], _brute_global(values, tree, distances, 0.7, b), rtol=1e-10)


def test_global_propagation_float32_with_embedding():
  rng = np.random.default_rng(5)
  image = rng.uniform(size=(2, 5, 6, 3)).astype(np.float32)
  tree = _mst(image)
  values = rng.uniform(size=(2, 5, 6, 2)).astype(np.float32)
  distances = _parent_sq_distances(image, tree)
  got = np.asarray(_global(values, tree, distances, zeta=0.3))
  flat = values.reshape(2, 30, 2).astype(np.float64)
  for b in range(2):
    np.testing.assert_allclose(
        got[b].reshape(30, 2),
        _brute_global(flat, tree, np.asarray(distances, np.float64), 0.3, b),
        rtol=1e-5, atol=1e-6)


def _naive_local(values, image, zeta_s, radius, num_iter, mask):
  batch, height, width, _ = values.shape
  m = np.ones((batch, height, width)) if mask is None else mask
  x = values * m[..., None]
  for _ in range(num_iter):
    new = np.zeros_like(x)
    for b in range(batch):
      for i in range(height):
        for j in range(width):
          num, den = 0.0, 0.0
          for di in range(-radius, radius + 1):
            for dj in range(-radius, radius + 1):
              y, z = i + di, j + dj
              if 0 <= y < height and 0 <= z < width:
                a = np.exp(-np.sum((image[b, y, z] - image[b, i, j])**2)
                           / zeta_s**2)
                num = num + a * x[b, y, z]
                den += a
          new[b, i, j] = num / den * m[b, i, j]
    x = new
  return x


@pytest.mark.parametrize('radius,use_mask', [(2, True), (1, False)])
def test_local_propagation_matches_loop(radius, use_mask):
  rng = np.random.default_rng(6)
  values = rng.uniform(size=(2, 5, 6, 2)).astype(np.float32)
  image = rng.normal(scale=0.5, size=(2, 5, 6, 3)).astype(np.float32)
  mask = ((rng.uniform(size=(2, 5, 6)) > 0.3).astype(np.float32)
          if use_mask else None)
  got = _local(values, image, zeta_s=0.8, radius=radius, num_iter=3, mask=mask)
  np.testing.assert_allclose(
      got, _naive_local(values.astype(np.float64), image.astype(np.float64),
                        0.8, radius, 3, mask), rtol=1e-5, atol=1e-6)


def test_batch_equals_per_image():
  # The shapes and options of the float32 tests above, to reuse their
  # compilations for the batch.
  rng = np.random.default_rng(7)
  image = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
  values = rng.uniform(size=(2, 5, 6, 2)).astype(np.float32)
  mask = (rng.uniform(size=(2, 5, 6)) > 0.3).astype(np.float32)

  def run(image, values, mask):
    tree = _mst(image)
    distances = _parent_sq_distances(image, tree)
    return (tree,
            _tree_filter(values, tree, jnp.exp(-distances)),
            _global(values, tree, distances, zeta=0.3),
            _local(values, image, zeta_s=0.8, radius=2, num_iter=3, mask=mask))

  batched = run(image, values, mask)
  assert not np.array_equal(batched[0].parent[0], batched[0].parent[1])
  for b in range(2):
    single = run(image[b:b + 1], values[b:b + 1], mask[b:b + 1])
    for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      np.testing.assert_allclose(got[b:b + 1], want, rtol=1e-6, atol=1e-7)
