# CUDA source -> host C++ for the emulator (cuda_runtime.h beside this file).
#   kernel<<<grid, block, smem, stream>>>(args)  -> emu_launch_kernel(grid, block, smem, &kernel, "kernel", [](auto&... a) { kernel(a...); }, args)
#   asm("ptx" : outs : ins)                      -> emu_<instruction>(outs..., ins...)
#   __shared__ T a[n], b[m];                     -> static T a[n], b[m]; EMU_SHARED(a); EMU_SHARED(b);
#   extern __shared__ T s[];                     -> T* s = (T*)emu_dynamic_smem();
#   #include "x.cuh" (beside the .cu)            -> its text, recursively (once each)
# Usage: python3 convert.py in.cu [out.cc]
import os, re, sys

src = open(sys.argv[1]).read()

# ---- local .cuh headers (PTX wrappers) are inlined, so that their asm is rewritten too ----
INCLUDE = re.compile(r'^#include\s+"([\w.]+\.cuh)"\s*$', re.M)


def inline_headers(s, here, seen):
    def one(m):
        path = os.path.join(here, m.group(1))
        if path in seen: return ''
        seen.add(path)
        body = open(path).read().replace('#pragma once', '')
        return inline_headers(body, here, seen)
    return INCLUDE.sub(one, s)


src = inline_headers(src, os.path.dirname(os.path.abspath(sys.argv[1])), set())


def balanced(s, i, open_='(', close=')'):
    """index of the bracket closing the one at s[i]"""
    depth = 0
    for j in range(i, len(s)):
        if s[j] == open_: depth += 1
        elif s[j] == close:
            depth -= 1
            if depth == 0: return j
    raise ValueError('unbalanced at %d: %s' % (i, s[i:i + 60]))


def split_top(s, sep=','):
    """split at separators outside (), [], <> (template args of a kernel name) and strings"""
    parts, depth, cur, q = [], 0, '', False
    for ch in s:
        if ch == '"': q = not q
        if not q:
            if ch in '([': depth += 1
            elif ch in ')]': depth -= 1
        if ch == sep and depth == 0 and not q:
            parts.append(cur); cur = ''
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


# ---- inline PTX ----
PTX = {
    'cp.async.cg.shared.global': 'emu_cp_async_cg_16',
    'cp.async.commit_group': 'emu_cp_async_commit',
    'cp.async.wait_group': 'emu_cp_async_wait',
    'ldmatrix.sync.aligned.m8n8.x4.shared.b16': 'emu_ldmatrix_x4',
    'ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16': 'emu_ldmatrix_x4_trans',
    'mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32': 'emu_mma_m16n8k16_bf16',
    'rcp.approx.ftz.f32': 'emu_rcp_approx',
}


ASM = re.compile(r'\basm\s*(?:volatile\s*)?\(')


def convert_asm(s):
    out, i = [], 0
    while True:
        m = ASM.search(s, i)
        if not m: out.append(s[i:]); break
        a = m.end() - 1
        e = balanced(s, a)
        body = s[a + 1:e]
        sections = split_top(body, ':')
        template = ''.join(re.findall(r'"((?:[^"\\]|\\.)*)"', sections[0]))
        instr = re.match(r'[\w.]+', template).group(0)
        if instr not in PTX: raise ValueError('no emulation for PTX %r' % instr)
        ops = []
        for sec in sections[1:3]:
            for op in split_top(sec):
                if not op: continue
                mm = re.match(r'"[^"]*"\s*\((.*)\)$', op, re.S)
                ops.append(mm.group(1).strip())
        out.append(s[i:m.start()])
        out.append('%s(%s)' % (PTX[instr], ', '.join(ops)))
        i = e + 1
    return ''.join(out)


src = convert_asm(src)

# ---- shared memory ----
src = re.sub(r'extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;',
             r'\1* \2 = (\1*)emu_dynamic_smem();', src)


def shared(m):
    decl = m.group(1)
    first = re.search(r'\b(\w+)\s*\[', decl)
    names = re.findall(r'\b(\w+)\s*(?:\[[^\]]*\])+', decl[first.start():])
    return 'static %s; %s' % (decl, ' '.join('EMU_SHARED(%s);' % n for n in names))


src = re.sub(r'(?<![\w#])__shared__\s+([^;(]+\[[^;]*);', shared, src)

# ---- launches ----
out, i = [], 0
while True:
    k = src.find('<<<', i)
    if k < 0:
        out.append(src[i:]); break
    j = k  # kernel name: identifier with optional template args, scanning backwards
    if src[j - 1] == '>':
        depth = 0
        while True:
            j -= 1
            if src[j] == '>': depth += 1
            elif src[j] == '<':
                depth -= 1
                if depth == 0: break
    while j > 0 and (src[j - 1].isalnum() or src[j - 1] == '_'): j -= 1
    name = src[j:k]
    e = src.find('>>>', k)
    parts = split_top(src[k + 3:e])
    smem = parts[2] if len(parts) > 2 else '0'
    a0 = e + 3
    assert src[a0] == '(', src[a0:a0 + 20]
    a = balanced(src, a0)
    args = src[a0 + 1:a]
    out.append(src[i:j])
    key = 'nullptr' if smem == '0' else '(const void*)&' + name  # the cudaFuncSetAttribute key
    # the arguments are converted and copied at the launch (a captured launch replays with them)
    out.append('emu_launch_kernel(dim3(%s), dim3(%s), (size_t)(%s), %s, "%s", [](auto&... a) { %s(a...); }%s)'
               % (parts[0], parts[1], smem, key, name.split('<')[0], name, (', ' + args) if args.strip() else ''))
    i = a + 1
result = '#include <cuda_runtime.h>\n#line 1 "%s"\n' % sys.argv[1] + ''.join(out)
if len(sys.argv) > 2:
    open(sys.argv[2], 'w').write(result)
else:
    sys.stdout.write(result)
