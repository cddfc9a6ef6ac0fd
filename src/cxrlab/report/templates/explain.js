const tb=document.querySelector('#rows tbody'),rows=[...tb.rows],f=id=>document.getElementById(id);
function apply(){const c=f('fclass').value,p=f('fpred').value,o=f('foutcome').value,
lo=parseFloat(f('fconf').value||'0'),hi=parseFloat(f('fconfmax').value||'1');let n=0;
for(const r of rows){const d=r.dataset,cf=parseFloat(d.confidence);
const show=(!c||d.label===c)&&(!p||d.prediction===p)&&(!o||d.outcome===o)&&cf>=lo&&cf<=hi;
r.style.display=show?'':'none';n+=show}f('count').textContent=n+' of '+rows.length+' shown'}
document.querySelectorAll('.controls select,.controls input').forEach(e=>e.addEventListener('input',apply));
document.querySelectorAll('#rows th[data-key]').forEach(th=>th.addEventListener('click',()=>{
const k=th.dataset.key,num=th.dataset.num==='1',asc=!th.classList.contains('sorted-asc');
document.querySelectorAll('#rows th').forEach(t=>t.classList.remove('sorted-asc','sorted-desc'));
th.classList.add(asc?'sorted-asc':'sorted-desc');
rows.sort((a,b)=>{let x=a.dataset[k],y=b.dataset[k];if(num){x=parseFloat(x);y=parseFloat(y);
x=isNaN(x)?-1:x;y=isNaN(y)?-1:y}return (x<y?-1:x>y?1:0)*(asc?1:-1)});rows.forEach(r=>tb.appendChild(r))}));
apply();
